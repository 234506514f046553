fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc: a fresh machine needs no system protobuf compiler.
    std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        // Tensor payloads as `bytes::Bytes`: decoded without copying out of the receive buffer.
        .bytes(".dsv3.fleet.v1.Tensor.data")
        .compile_protos(&["proto/fleet.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto/fleet.proto");
    Ok(())
}
