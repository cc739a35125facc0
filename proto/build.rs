//! Compiles the shop protos with protox (pure Rust, no system `protoc`) and
//! writes the descriptor set that server reflection serves.
use prost::Message;
use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "shop/user/v1/user.proto",
    "shop/order/v1/order.proto",
    "shop/payment/v1/payment.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let fds = protox::compile(PROTOS, ["."])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("shop_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .codec_path("crate::codec::ShopCodec")
        .compile_fds(fds)?;
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    Ok(())
}
