//! The gRPC envelope shared by masters and clients. It owns the generated
//! tonic/prost code for `proto/orc.proto` and the sockets that code runs on
//! (`wire`: TCP streams that send each burst of HTTP/2 frames in one write); it
//! must not depend on any other orc crate.
tonic::include_proto!("orc");

pub mod link;
pub mod wire;
