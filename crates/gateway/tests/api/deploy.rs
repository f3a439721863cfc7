//! The shipped deployment files start the gateway: defaults that its own settings validation
//! would refuse are caught here, not at `docker compose up`.

use gateway::Settings;
use gateway::config::Secret;

/// Every `${NAME:-default}` of a file: (NAME, default).
fn env_defaults(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        rest = &rest[start + 2..];
        let Some(end) = rest.find('}') else { break };
        if let Some((name, default)) = rest[..end].split_once(":-") {
            out.push((name.to_owned(), default.to_owned()));
        }
        rest = &rest[end + 1..];
    }
    out
}

#[test]
fn compose_default_secrets_pass_the_gateways_validation() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/docker-compose.yml"
    );
    let compose = std::fs::read_to_string(path).expect("deploy/docker-compose.yml");
    let defaults = env_defaults(&compose);
    let jwt = defaults
        .iter()
        .find(|(name, _)| name == "MES_GATEWAY_JWT_SECRET")
        .map(|(_, d)| d.clone())
        .expect("compose gives MES_GATEWAY_JWT_SECRET a default");
    let internal = defaults
        .iter()
        .find(|(name, _)| name == "MES_INTERNAL_KEY")
        .map(|(_, d)| d.clone())
        .expect("compose gives MES_INTERNAL_KEY a default");
    // The gateway as compose starts it, demo mode or not.
    for demo in [true, false] {
        let mut settings = Settings::defaults();
        settings.service.demo = demo;
        settings.jwt_secret = Secret(jwt.clone());
        settings.service.internal_key = Secret(internal.clone());
        settings
            .validate()
            .unwrap_or_else(|e| panic!("compose's default secrets (demo {demo}): {e}"));
    }
    // Every other default key or secret is long enough to be accepted as one.
    let secrets: Vec<_> = defaults
        .iter()
        .filter(|(name, _)| name.ends_with("_SECRET") || name.ends_with("_KEY"))
        .collect();
    assert!(secrets.len() >= 2, "{secrets:?}");
    for (name, default) in secrets {
        assert!(
            default.len() >= 32,
            "compose's default {name} is {} bytes; at least 32 are required",
            default.len()
        );
    }
}

#[test]
fn k8s_takes_the_login_client_address_from_the_header_the_ingress_appends() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../k8s/base/config.yaml");
    let config = std::fs::read_to_string(path).expect("k8s/base/config.yaml");
    let header = config
        .lines()
        .find_map(|l| l.trim().strip_prefix("MES_GATEWAY_CLIENT_IP_HEADER:"))
        .map(str::trim)
        .expect("the k8s base sets MES_GATEWAY_CLIENT_IP_HEADER");
    // Behind the ingress every tablet has the ingress's address: without the header, the
    // per-address login limit would be shared by the whole plant.
    assert_eq!(header, "x-forwarded-for");
    let mut settings = Settings::defaults();
    settings.service.demo = true;
    settings.client_ip_header = header.to_owned();
    settings.validate().expect("a valid header name");
}
