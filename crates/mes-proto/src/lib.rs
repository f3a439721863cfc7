//! The gRPC contracts shared by the MES services (`proto/mes/v1`), generated once.

#![allow(clippy::all, clippy::pedantic)]

pub mod mes {
    pub mod v1 {
        tonic::include_proto!("mes.v1");
    }
}

pub use mes::v1;

pub mod codec;

/// The encoded file descriptor set of every MES contract, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("mes_descriptor");
