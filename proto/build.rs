//! Compiles `proto/volley.proto` with a vendored `protoc` (none is installed on build machines).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    unsafe_env(&protoc);
    println!("cargo:rerun-if-changed=proto/volley.proto");
    tonic_prost_build::configure().compile_protos(&["proto/volley.proto"], &["proto"])?;
    Ok(())
}

fn unsafe_env(protoc: &std::path::Path) {
    // `set_var` is unsafe in edition 2024; this build script runs no other threads.
    #[allow(unsafe_code)]
    unsafe {
        std::env::set_var("PROTOC", protoc);
    }
}
