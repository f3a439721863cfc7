//! Black-box tests of the gateway: one binary, each test starts its own gateway with
//! `spawn_app()` against a fresh database and a unique Redis prefix.

mod auth;
mod backends;
mod deploy;
mod edge;
mod failures;
mod fakes;
mod helpers;
mod input;
mod limits;
mod logins;
mod operations;
mod rbac;
