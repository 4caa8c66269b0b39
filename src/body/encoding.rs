//! Bodies Desk compressed (`Content-Encoding`), read: to find a 401's `errorCode`, and
//! the secrets a recording must not hold.

use std::io::Read;

/// `body` decoded from `encoding` (`gzip`, `deflate` or `br`, as a client's
/// `Accept-Encoding` allows Desk), when it decodes whole to at most `limit` bytes. `None`
/// for another encoding, a broken body, or one longer than that.
pub fn decoded(encoding: &str, body: &[u8], limit: usize) -> Option<Vec<u8>> {
    let read = |reader: &mut dyn Read| {
        let mut out = Vec::new();
        reader.take(limit as u64 + 1).read_to_end(&mut out).ok()?;
        (out.len() <= limit).then_some(out)
    };
    match encoding.trim().to_ascii_lowercase().as_str() {
        "gzip" | "x-gzip" => read(&mut flate2::read::MultiGzDecoder::new(body)),
        // RFC 9110's deflate is zlib's format; some servers send raw deflate.
        "deflate" => read(&mut flate2::read::ZlibDecoder::new(body))
            .or_else(|| read(&mut flate2::read::DeflateDecoder::new(body))),
        "br" => read(&mut brotli_decompressor::Decompressor::new(body, 4096)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: usize = 64 * 1024;

    #[test]
    fn a_body_is_read_in_each_encoding_desk_may_use() {
        use std::io::Write;
        let text = br#"{"errorCode":"SCOPE_MISMATCH"}"#;
        let encoded = |encoding: &str| -> Vec<u8> {
            match encoding {
                "gzip" => {
                    let mut e = flate2::write::GzEncoder::new(Vec::new(), Default::default());
                    e.write_all(text).unwrap();
                    e.finish().unwrap()
                }
                "zlib" => {
                    let mut e = flate2::write::ZlibEncoder::new(Vec::new(), Default::default());
                    e.write_all(text).unwrap();
                    e.finish().unwrap()
                }
                "raw" => {
                    let mut e = flate2::write::DeflateEncoder::new(Vec::new(), Default::default());
                    e.write_all(text).unwrap();
                    e.finish().unwrap()
                }
                _ => text.to_vec(),
            }
        };
        for (header, body) in [
            ("gzip", encoded("gzip")),
            ("x-gzip", encoded("gzip")),
            ("deflate", encoded("zlib")),
            ("Deflate", encoded("raw")),
        ] {
            assert_eq!(
                decoded(header, &body, LIMIT).as_deref(),
                Some(&text[..]),
                "{header}"
            );
        }
        // Brotli of the same text (Python's `brotli.compress`), and what cannot be read.
        let brotli: &[u8] = &[
            0x8b, 0x0e, 0x80, 0x7b, 0x22, 0x65, 0x72, 0x72, 0x6f, 0x72, 0x43, 0x6f, 0x64, 0x65,
            0x22, 0x3a, 0x22, 0x53, 0x43, 0x4f, 0x50, 0x45, 0x5f, 0x4d, 0x49, 0x53, 0x4d, 0x41,
            0x54, 0x43, 0x48, 0x22, 0x7d, 0x03,
        ];
        assert_eq!(decoded("br", brotli, LIMIT).as_deref(), Some(&text[..]));
        assert_eq!(decoded("gzip", b"not gzip", LIMIT), None);
        assert_eq!(decoded("zstd", text, LIMIT), None);
        assert_eq!(decoded("identity", text, LIMIT), None);
        // Longer than the limit once decoded: not read.
        assert_eq!(decoded("gzip", &encoded("gzip"), text.len() - 1), None);
    }
}
