//! Fuzz the replication message decoder: bytes from the network must decode
//! or give a typed error, never panic.
#![no_main]

use hotstandby_protocol::wire::Message;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut pos = 0;
    while pos < data.len() {
        match Message::decode(&data[pos..]) {
            Ok((m, used)) => {
                assert!(used > 0);
                // What decodes re-encodes to the same bytes.
                assert_eq!(m.to_bytes(), &data[pos..pos + used]);
                pos += used;
            }
            Err(_) => break,
        }
    }
});
