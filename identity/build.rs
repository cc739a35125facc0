//! Compiles the identity API with protox (no system `protoc`).

const PROTO: &str = "../proto/minimesh/identity/v1/identity.proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let fds = protox::compile([PROTO], ["../proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed={PROTO}");
    Ok(())
}
