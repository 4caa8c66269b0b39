//! Bodies Desk compressed (`Content-Encoding`), read: to find a 401's `errorCode`, and
//! the secrets a recording must not hold.

use std::io::Read;

/// `body` decoded from `encoding` (`gzip`, `deflate` or `br`, as a client's
/// `Accept-Encoding` allows Desk), when it decodes whole to at most `limit` bytes. `None`
/// for another encoding, a broken body, or one longer than that.
pub fn decoded(encoding: &str, body: &[u8], limit: usize) -> Option<Vec<u8>> {
    match decoded_prefix(encoding, body, limit)? {
        (bytes, Decoded::Whole) => Some(bytes),
        _ => None,
    }
}

/// How far [`decoded_prefix`] read a body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded {
    /// To its end: the whole body.
    Whole,
    /// To where its bytes stop (a body cut short, or broken there): all it holds.
    Cut,
    /// To `limit` bytes: more was left.
    Capped,
}

/// What `body`, encoded with `encoding`, decodes to, as far as it goes (a body cut short
/// decodes up to its cut) and up to `limit` bytes; with how far that is. `None` for
/// another encoding, or a body that decodes to nothing before it breaks.
pub fn decoded_prefix(encoding: &str, body: &[u8], limit: usize) -> Option<(Vec<u8>, Decoded)> {
    let read = |reader: &mut dyn Read| {
        // `read_to_end` keeps what it read before an error.
        let mut out = Vec::new();
        let read = reader
            .take(u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1))
            .read_to_end(&mut out);
        match read {
            Ok(_) if out.len() > limit => {
                out.truncate(limit);
                Some((out, Decoded::Capped))
            }
            Ok(_) => Some((out, Decoded::Whole)),
            Err(_) if out.is_empty() => None,
            Err(_) => Some((out, Decoded::Cut)),
        }
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

    #[test]
    fn a_body_cut_short_decodes_up_to_its_cut() {
        use std::io::Write;
        let text: Vec<u8> = (0..200_000u32)
            .flat_map(|i| i.to_string().into_bytes())
            .collect();
        let mut e = flate2::write::GzEncoder::new(Vec::new(), Default::default());
        e.write_all(&text).unwrap();
        let gzip = e.finish().unwrap();
        let (whole, how) = decoded_prefix("gzip", &gzip, usize::MAX).unwrap();
        assert_eq!((whole.len(), how), (text.len(), Decoded::Whole));
        let (start, how) = decoded_prefix("gzip", &gzip[..gzip.len() / 2], usize::MAX).unwrap();
        assert_eq!(how, Decoded::Cut);
        assert!(
            start.len() > 1000 && text.starts_with(&start),
            "{}",
            start.len()
        );
        let (capped, how) = decoded_prefix("gzip", &gzip, 1000).unwrap();
        assert_eq!((capped.len(), how), (1000, Decoded::Capped));
        assert_eq!(decoded_prefix("gzip", b"not gzip", 1000), None);
        assert_eq!(decoded_prefix("zstd", &text, 1000), None);
    }
}
