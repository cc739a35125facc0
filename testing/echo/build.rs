//! Compiles the test echo proto with protox (no system `protoc`).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let fds = protox::compile(["acme/echo/v1/echo.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed=proto/acme/echo/v1/echo.proto");
    Ok(())
}
