//! The codec every generated client and server uses: prost's, except that a *request* that
//! does not decode as its message type is the caller's fault and answered `INVALID_ARGUMENT`,
//! not `INTERNAL` (tonic-prost's answer for any message). `INTERNAL` stays for what really is
//! the server's fault, so an alert on it means something and the gRPC fuzzer can demand none.
//! An *answer* a client cannot decode keeps `INTERNAL`: it is not the caller's fault, and the
//! gateway treats it as a failed call.
//!
//! Requests and answers are told apart by name: every RPC's input type is a `…Request` and no
//! output type is (checked against the descriptor set in the tests below).

use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstEncoder};

/// [`ProstCodec`] with undecodable requests answered `INVALID_ARGUMENT`.
#[derive(Debug, Clone)]
pub struct MesCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for MesCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for MesCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = MesDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::default().encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        MesDecoder(PhantomData)
    }
}

/// Decodes `U`.
#[derive(Debug, Clone)]
pub struct MesDecoder<U>(PhantomData<fn() -> U>);

impl<U: Message + Default> Decoder for MesDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(|e| {
            if is_request::<U>() {
                invalid_request(e)
            } else {
                Status::internal(format!("failed to decode Protobuf message: {e}"))
            }
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

/// Whether `U` is an RPC's input type.
fn is_request<U>() -> bool {
    std::any::type_name::<U>().ends_with("Request")
}

/// The status of a request that does not decode.
pub fn invalid_request(e: prost::DecodeError) -> Status {
    Status::invalid_argument(format!(
        "the request is not a valid protobuf message of its type: {e}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost_types::FileDescriptorSet;

    #[test]
    fn every_input_type_is_a_request_and_no_output_type_is() {
        let set = FileDescriptorSet::decode(crate::FILE_DESCRIPTOR_SET).unwrap();
        let mut methods = 0;
        for file in &set.file {
            for service in &file.service {
                for m in &service.method {
                    methods += 1;
                    let (input, output) = (m.input_type(), m.output_type());
                    assert!(input.ends_with("Request"), "{} takes {input}", m.name());
                    assert!(
                        !output.ends_with("Request"),
                        "{} answers {output}",
                        m.name()
                    );
                }
            }
        }
        assert!(methods > 15, "only {methods} methods in the descriptor set");
        assert!(is_request::<crate::v1::SubmitScansRequest>());
        assert!(!is_request::<crate::v1::SubmitScansResponse>());
    }

    #[test]
    fn an_undecodable_request_is_the_callers_fault() {
        let err = crate::v1::SubmitScansRequest::decode(&[0xff, 0xff, 0xff][..]).unwrap_err();
        let status = invalid_request(err);
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
    }
}
