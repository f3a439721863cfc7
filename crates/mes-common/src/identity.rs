//! The authenticated caller, forwarded by the gateway to the services in gRPC metadata
//! (`x-mes-user`, `x-mes-roles`, `x-mes-device`, `x-mes-station`). Services check roles again
//! for sensitive operations (voids, holds).

use tonic::metadata::{MetadataMap, MetadataValue};

pub const USER: &str = "x-mes-user";
pub const ROLES: &str = "x-mes-roles";
pub const DEVICE: &str = "x-mes-device";
pub const STATION: &str = "x-mes-station";

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caller {
    pub user: String,
    pub roles: Vec<String>,
    pub device: Option<String>,
    pub station: Option<String>,
}

impl Caller {
    /// A caller for internal jobs (erp-sync pulls, projections).
    pub fn system(name: &str) -> Self {
        Self {
            user: name.to_owned(),
            roles: vec!["system".into()],
            device: None,
            station: None,
        }
    }

    /// Reads the caller from metadata; `None` when no user is named.
    pub fn from_metadata(md: &MetadataMap) -> Option<Self> {
        let get = |k: &str| {
            md.get(k)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|s| !s.is_empty())
        };
        let user = get(USER)?.to_owned();
        let roles = get(ROLES)
            .map(|r| {
                r.split(',')
                    .map(|s| s.trim().to_owned())
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        Some(Self {
            user,
            roles,
            device: get(DEVICE).map(str::to_owned),
            station: get(STATION).map(str::to_owned),
        })
    }

    /// Writes the caller into metadata (values that are not valid header text are skipped).
    pub fn write_to(&self, md: &mut MetadataMap) {
        let mut put = |k: &'static str, v: &str| {
            if let Ok(v) = MetadataValue::try_from(v) {
                md.insert(k, v);
            }
        };
        put(USER, &self.user);
        put(ROLES, &self.roles.join(","));
        if let Some(d) = &self.device {
            put(DEVICE, d);
        }
        if let Some(s) = &self.station {
            put(STATION, s);
        }
    }

    pub fn has_any_role(&self, roles: &[&str]) -> bool {
        self.roles
            .iter()
            .any(|r| r == "admin" || roles.contains(&r.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_through_metadata() {
        let c = Caller {
            user: "op1".into(),
            roles: vec!["operator".into(), "quality".into()],
            device: Some("TAB-10".into()),
            station: Some("ST-10".into()),
        };
        let mut md = MetadataMap::new();
        c.write_to(&mut md);
        assert_eq!(Caller::from_metadata(&md), Some(c.clone()));
        assert!(c.has_any_role(&["quality"]));
        assert!(!c.has_any_role(&["supervisor"]));
        assert!(Caller::from_metadata(&MetadataMap::new()).is_none());
    }

    #[test]
    fn admin_has_every_role() {
        let c = Caller {
            user: "a".into(),
            roles: vec!["admin".into()],
            ..Default::default()
        };
        assert!(c.has_any_role(&["supervisor"]));
    }
}
