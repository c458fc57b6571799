fn main() {
    tonic_prost_build::compile_protos("proto/orc.proto")
        .expect("compile orc.proto (needs protoc: apt install protobuf-compiler)");
}
