//! Admin commands, for production where demo users are never seeded:
//!
//! ```text
//! gateway user add --username alice --role operator [--role quality]   # password from stdin
//! gateway user disable --username alice
//! gateway device enrol --id TAB-40 --station ST-40                  # prints the device secret
//! gateway device withdraw --id TAB-40
//! gateway serve                                                       # the default
//! ```
//!
//! They use the gateway's own database settings (`MES_GATEWAY_DATABASE_URL`, …) and run its
//! migrations first.

use std::io::BufRead;

use anyhow::{Context, bail};

use crate::Settings;
use crate::auth::{ROLES, hash_password};
use crate::input::is_ident;
use crate::store;

pub const USAGE: &str = "usage:
  gateway [serve]
  gateway user add --username NAME --role ROLE [--role ROLE ...]   (password read from stdin)
  gateway user disable --username NAME
  gateway device enrol --id DEVICE --station STATION   (prints the device's new secret, once)
  gateway device withdraw --id DEVICE
roles: operator, supervisor, quality, planner, admin";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    UserAdd {
        username: String,
        roles: Vec<String>,
    },
    UserDisable {
        username: String,
    },
    DeviceEnrol {
        id: String,
        station: String,
    },
    DeviceWithdraw {
        id: String,
    },
    Help,
}

fn options(args: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let Some(name) = flag.strip_prefix("--") else {
            bail!("unexpected argument {flag:?}\n{USAGE}");
        };
        let value = it
            .next()
            .with_context(|| format!("--{name} needs a value\n{USAGE}"))?;
        out.push((name.to_owned(), value.clone()));
    }
    Ok(out)
}

fn one(opts: &[(String, String)], name: &str) -> anyhow::Result<String> {
    let mut values = opts.iter().filter(|(k, _)| k == name).map(|(_, v)| v);
    let v = values
        .next()
        .with_context(|| format!("--{name} is required\n{USAGE}"))?;
    anyhow::ensure!(values.next().is_none(), "--{name} given twice");
    Ok(v.clone())
}

fn only(opts: &[(String, String)], allowed: &[&str]) -> anyhow::Result<()> {
    for (k, _) in opts {
        anyhow::ensure!(
            allowed.contains(&k.as_str()),
            "unknown option --{k}\n{USAGE}"
        );
    }
    Ok(())
}

impl Command {
    /// `Ok(None)` means: serve.
    pub fn parse(args: impl IntoIterator<Item = String>) -> anyhow::Result<Option<Self>> {
        let args: Vec<String> = args.into_iter().collect();
        let words: Vec<&str> = args.iter().take(2).map(String::as_str).collect();
        let cmd = match words.as_slice() {
            [] | ["serve"] => return Ok(None),
            ["help" | "--help" | "-h", ..] => Command::Help,
            ["user", "add"] => {
                let opts = options(&args[2..])?;
                only(&opts, &["username", "role"])?;
                let username = one(&opts, "username")?;
                let roles: Vec<String> = opts
                    .iter()
                    .filter(|(k, _)| k == "role")
                    .map(|(_, v)| v.clone())
                    .collect();
                anyhow::ensure!(!roles.is_empty(), "--role is required\n{USAGE}");
                for r in &roles {
                    anyhow::ensure!(ROLES.contains(&r.as_str()), "unknown role {r:?}\n{USAGE}");
                }
                anyhow::ensure!(
                    !username.is_empty()
                        && username.len() <= 64
                        && username
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"._@-".contains(&b)),
                    "username must be 1 to 64 letters, digits or . _ @ -"
                );
                Command::UserAdd { username, roles }
            }
            ["user", "disable"] => {
                let opts = options(&args[2..])?;
                only(&opts, &["username"])?;
                Command::UserDisable {
                    username: one(&opts, "username")?,
                }
            }
            ["device", "enrol" | "enroll"] => {
                let opts = options(&args[2..])?;
                only(&opts, &["id", "station"])?;
                let id = one(&opts, "id")?;
                let station = one(&opts, "station")?;
                anyhow::ensure!(is_ident(&id), "device id: {}", crate::input::IDENT_RULE);
                anyhow::ensure!(is_ident(&station), "station: {}", crate::input::IDENT_RULE);
                Command::DeviceEnrol { id, station }
            }
            ["device", "withdraw"] => {
                let opts = options(&args[2..])?;
                only(&opts, &["id"])?;
                Command::DeviceWithdraw {
                    id: one(&opts, "id")?,
                }
            }
            _ => bail!("unknown command\n{USAGE}"),
        };
        Ok(Some(cmd))
    }
}

/// Runs an admin command against the gateway's database and prints what it did.
pub async fn run(command: Command, settings: Settings) -> anyhow::Result<()> {
    let out = execute(command, settings).await?;
    println!("{out}");
    Ok(())
}

/// Runs an admin command against the gateway's database: what it did, to print.
pub async fn execute(command: Command, settings: Settings) -> anyhow::Result<String> {
    if command == Command::Help {
        return Ok(USAGE.to_owned());
    }
    let pool = store::prepare(&settings.service).await?;
    let out = match command {
        Command::UserAdd { username, roles } => {
            eprintln!("password for {username} (one line on stdin):");
            let mut line = String::new();
            std::io::stdin().lock().read_line(&mut line)?;
            let password = line.trim_end_matches(['\r', '\n']).to_owned();
            anyhow::ensure!(
                password.chars().count() >= 8 && password.len() <= 256,
                "the password must be 8 to 256 characters"
            );
            let hash = hash_password(password).await?;
            store::upsert_user(&pool, &username, &hash, &roles).await?;
            format!("user {username} saved with roles {}", roles.join(","))
        }
        Command::UserDisable { username } => {
            anyhow::ensure!(
                store::disable_user(&pool, &username).await?,
                "no user {username}"
            );
            format!("user {username} disabled")
        }
        Command::DeviceEnrol { id, station } => {
            let secret = crate::auth::new_device_secret();
            let hash = crate::auth::device_secret_hash(&secret);
            store::enrol_device(&pool, &id, &station, &hash).await?;
            format!(
                "device {id} enrolled at station {station}; configure its secret on the device \
                 (shown once, only its digest is stored; enrolling again issues a new one):\n\
                 device secret: {secret}"
            )
        }
        Command::DeviceWithdraw { id } => {
            anyhow::ensure!(store::withdraw_device(&pool, &id).await?, "no device {id}");
            format!("device {id} withdrawn")
        }
        Command::Help => USAGE.to_owned(),
    };
    pool.close().await;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> anyhow::Result<Option<Command>> {
        Command::parse(s.split_whitespace().map(str::to_owned))
    }

    #[test]
    fn commands_parse() {
        assert_eq!(parse("").unwrap(), None);
        assert_eq!(parse("serve").unwrap(), None);
        assert_eq!(
            parse("user add --username alice --role operator --role quality").unwrap(),
            Some(Command::UserAdd {
                username: "alice".into(),
                roles: vec!["operator".into(), "quality".into()]
            })
        );
        assert_eq!(
            parse("device enrol --id TAB-40 --station ST-40").unwrap(),
            Some(Command::DeviceEnrol {
                id: "TAB-40".into(),
                station: "ST-40".into()
            })
        );
        assert!(parse("user add --username alice --role wizard").is_err());
        assert!(parse("user add --username alice").is_err());
        assert!(parse("device enrol --id TAB-40").is_err());
        assert!(parse("device enrol --id TAB-40 --station ST-40 --x 1").is_err());
        assert!(parse("frobnicate").is_err());
    }
}
