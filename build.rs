//! Compiles `proto/logging/v1/*.proto` with tonic's codegen. `protoc` comes from
//! the `protoc-bin-vendored` crate, so a fresh machine needs nothing installed.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // prost-build emits no rerun-if-changed lines of its own.
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=build.rs");

    if std::env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path()?;
        // SAFETY: build scripts are single-threaded at this point.
        unsafe { std::env::set_var("PROTOC", protoc) };
    }
    let vendored_include = protoc_bin_vendored::include_path()?;
    let vendored_include = vendored_include.to_str().ok_or("non-UTF-8 include path")?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);

    tonic_prost_build::configure()
        // prost's codec, with decode errors as INVALID_ARGUMENT naming the
        // message (src/codec.rs).
        .codec_path("crate::codec::LogdCodec")
        .file_descriptor_set_path(out_dir.join("logging_v1_descriptor.bin"))
        .compile_protos(
            &["proto/logging/v1/logging.proto", "proto/logging/v1/admin.proto"],
            &["proto", vendored_include],
        )?;
    Ok(())
}
