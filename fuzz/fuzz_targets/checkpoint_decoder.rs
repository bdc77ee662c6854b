//! Fuzz the checkpoint decoder: any bytes must give a checked checkpoint
//! or a typed error, never a panic or an out-of-bounds read. The bytes are
//! also tried with their trailer hash made right (`reseal`), so the state
//! decoder and the item parser are reached, not only the checksum.
#![no_main]

use hotstandby_protocol::checkpoint::{peek_state, reseal, Checkpoint};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = peek_state(data);
    let _ = Checkpoint::parse(data).map_err(|e| e.to_string());
    let mut sealed = data.to_vec();
    reseal(&mut sealed);
    if let Ok(c) = Checkpoint::parse(&sealed) {
        for it in c.items() {
            let _ = it.map_err(|e| e.to_string());
        }
    }
});
