//! Serves in-memory exports until killed, for trying clients by hand and for
//! throughput measurements:
//!
//! ```text
//! cargo run --release -p nbd --example memserve -- 127.0.0.1:10809 1024
//! nbdinfo --list nbd://127.0.0.1:10809
//! nbdcopy nbd://127.0.0.1:10809/disk null:
//! ```
//!
//! Arguments: listen address (default 127.0.0.1:10809) and export size in
//! MiB (default 64). Exports: `disk` (writable, filled with a pattern, dirty
//! bitmap `52dec0d9-b943-9d10-61d5-4c1be97b6563/81` marking its first MiB)
//! and `ro` (a read-only copy).

use std::sync::Arc;

use nbd::{Export, MemoryExport, MemoryExports, Server};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:10809".into());
    let mib: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(64);
    let size = mib << 20;
    let exports = Arc::new(MemoryExports::new());
    let disk = Arc::new(MemoryExport::new(size, 64 * 1024).with_description("in-memory disk"));
    let ro = Arc::new(MemoryExport::new(size, 64 * 1024).with_description("read-only copy"));
    let chunk: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    for off in (0..size).step_by(chunk.len()) {
        let n = chunk.len().min((size - off) as usize);
        disk.write(off, &chunk[..n])?;
        ro.write(off, &chunk[..n])?;
    }
    disk.add_bitmap("52dec0d9-b943-9d10-61d5-4c1be97b6563/81");
    disk.write(0, &chunk[..size.min(chunk.len() as u64) as usize])?;
    exports.insert("disk", disk);
    exports.insert("ro", Arc::new(Arc::into_inner(ro).ok_or("shared")?.read_only()));
    let server = Server::new(exports).serve_tcp(std::net::TcpListener::bind(&addr)?)?;
    println!("serving {} and {}", server.uri("disk"), server.uri("ro"));
    loop {
        std::thread::park();
    }
}
