//! The gRPC envelope shared by masters and clients. It owns only the generated
//! tonic/prost code for `proto/orc.proto`; it must not depend on any other orc crate.
tonic::include_proto!("orc");
