//! Fuzz the log decoder: any bytes must either decode to records or give a
//! typed error, never panic or read out of bounds. The same bytes also go
//! to the packed-batch decoder.
#![no_main]

use hotstandby_protocol::frame::{decode_payload, FrameReader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Whole streams, as a log file or the network delivers them.
    let mut aligned = rkyv::util::AlignedVec::<16>::new();
    aligned.extend_from_slice(data);
    if let Ok(reader) = FrameReader::new(&aligned) {
        for f in reader {
            match f {
                Ok(frame) => {
                    let _ = frame.record();
                }
                Err(e) => {
                    let _ = e.to_string();
                    break;
                }
            }
        }
    }
    // Bare payloads, to reach the rkyv validator without a valid CRC.
    let _ = decode_payload(&aligned);
    // Bare packed batches: what decodes re-packs to the same calls, and
    // the checker agrees with the decoder.
    use hotstandby_protocol::packed;
    match packed::unpack(data) {
        Ok(calls) => {
            assert_eq!(packed::check(data).ok(), Some(calls.len()));
            assert_eq!(packed::unpack(&packed::pack(&calls)).ok(), Some(calls));
        }
        Err(_) => assert!(packed::check(data).is_err()),
    }
});
