//! Generates the Rust code of every contract in `proto/mes/v1` once, for all services, plus the
//! file descriptor set that gRPC server reflection serves.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let protos: Vec<PathBuf> = [
        "common",
        "scan_ingest",
        "master_data",
        "event_feed",
        "trace_query",
        "erp_sync",
    ]
    .iter()
    .map(|name| root.join(format!("mes/v1/{name}.proto")))
    .collect();
    for p in &protos {
        println!("cargo:rerun-if-changed={}", p.display());
    }

    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    let well_known = protoc_bin_vendored::include_path()?;

    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("mes_descriptor.bin"))
        // RPCs that a later issue fills in answer UNIMPLEMENTED until then.
        .generate_default_stubs(true)
        // Undecodable requests are INVALID_ARGUMENT, not tonic-prost's INTERNAL (src/codec.rs).
        .codec_path("crate::codec::MesCodec")
        .compile_with_config(config, &protos, &[root, well_known])?;
    Ok(())
}
