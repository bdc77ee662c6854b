//! Builds the in-process syscall buffer (`preload/hsbuf.c`) into a shared
//! object that the tracer embeds and installs at run time.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("libhsbuf.so");
    let src = "preload/hsbuf.c";
    println!("cargo:rerun-if-changed={src}");
    let cc = std::env::var("CC").unwrap_or_else(|_| "gcc".into());
    let st = Command::new(&cc)
        .args([
            "-O2",
            "-fPIC",
            "-shared",
            "-mno-red-zone",
            "-fno-stack-protector",
            "-Wall",
            "-Werror",
            "-Wl,-soname,libhotstandby-preload.so",
            "-o",
        ])
        .arg(&out)
        .arg(src)
        .status()
        .unwrap_or_else(|e| panic!("running {cc} to build {src}: {e}"));
    assert!(st.success(), "{cc} failed to build {src}");
}
