//! Fuzzes the vmdk reader: open + map + read at input-derived offsets + check.
#![no_main]

#[path = "image_common.rs"]
mod image_common;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    image_common::run(thinline_format::Format::Vmdk, data);
});
