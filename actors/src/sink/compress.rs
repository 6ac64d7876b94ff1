//! Compression on the wire (DESIGN §6b): the one `compression` key of the
//! sinks that send bodies (`http`: `Content-Encoding`; `mqtt` with
//! `payload = "batch"`: the PUBLISH payload; `s3`: the object), and the one
//! encoder they share.
//!
//! Levels are fixed where telemetry pays best for the CPU: gzip as given
//! (the S3 sink's `gzip_level`, else 6), zstd level 3 (its default: on
//! repetitive NDJSON it beats gzip -9 at a fraction of the time).

use std::io::Write;

use crate::keys::KeyError;

/// zstd's own default level.
const ZSTD_LEVEL: i32 = 3;
/// gzip level when the sink names none.
pub const GZIP_DEFAULT_LEVEL: u32 = 6;

/// How a body is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// As is.
    #[default]
    None,
    /// gzip (RFC 1952) at this level, 0-9.
    Gzip(u32),
    /// zstd (RFC 8878), one frame.
    Zstd,
}

impl Compression {
    /// Parses the `compression` key: `none`, `gzip` or `zstd`; `None` gives
    /// `default`. gzip takes `gzip_level`.
    pub fn from_key(
        value: Option<&str>,
        default: Compression,
        gzip_level: u32,
    ) -> Result<Self, KeyError> {
        match value {
            None => Ok(default),
            Some("none") => Ok(Compression::None),
            Some("gzip") => Ok(Compression::Gzip(gzip_level.min(9))),
            Some("zstd") => Ok(Compression::Zstd),
            Some(other) => Err(KeyError::new(
                "compression",
                format!("{other:?}: expected none, gzip or zstd"),
            )),
        }
    }

    /// The token of `Content-Encoding` and of the MQTT user property
    /// `content-encoding`: `identity`, `gzip` or `zstd`.
    pub fn encoding(self) -> &'static str {
        match self {
            Compression::None => "identity",
            Compression::Gzip(_) => "gzip",
            Compression::Zstd => "zstd",
        }
    }

    /// The file name suffix after `.ndjson`: empty, `.gz` or `.zst`.
    pub fn suffix(self) -> &'static str {
        match self {
            Compression::None => "",
            Compression::Gzip(_) => ".gz",
            Compression::Zstd => ".zst",
        }
    }

    /// The NDJSON of `lines` (one line each, `\n`-terminated), compressed.
    pub fn ndjson<'a, I>(self, lines: I, raw_len: usize) -> std::io::Result<Vec<u8>>
    where
        I: IntoIterator<Item = &'a [u8]>,
    {
        fn write_all<'a, W: Write>(
            w: &mut W,
            lines: impl IntoIterator<Item = &'a [u8]>,
        ) -> std::io::Result<()> {
            for l in lines {
                w.write_all(l)?;
                w.write_all(b"\n")?;
            }
            Ok(())
        }
        match self {
            Compression::None => {
                let mut out = Vec::with_capacity(raw_len);
                write_all(&mut out, lines)?;
                Ok(out)
            }
            Compression::Gzip(level) => {
                let mut enc = flate2::write::GzEncoder::new(
                    Vec::with_capacity(raw_len / 4 + 64),
                    flate2::Compression::new(level),
                );
                write_all(&mut enc, lines)?;
                enc.finish()
            }
            Compression::Zstd => {
                let mut enc = zstd::stream::write::Encoder::new(
                    Vec::with_capacity(raw_len / 6 + 64),
                    ZSTD_LEVEL,
                )?;
                write_all(&mut enc, lines)?;
                enc.finish()
            }
        }
    }

    /// `body` compressed as a whole.
    pub fn encode(self, body: &[u8]) -> std::io::Result<Vec<u8>> {
        match self {
            Compression::None => Ok(body.to_vec()),
            Compression::Gzip(level) => {
                let mut enc = flate2::write::GzEncoder::new(
                    Vec::with_capacity(body.len() / 4 + 64),
                    flate2::Compression::new(level),
                );
                enc.write_all(body)?;
                enc.finish()
            }
            Compression::Zstd => zstd::bulk::compress(body, ZSTD_LEVEL),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn lines() -> Vec<Vec<u8>> {
        (0..200)
            .map(|i| {
                format!(r#"{{"device_id":"d-{i}","metrics":{{"t":{}.5}}}}"#, i % 7).into_bytes()
            })
            .collect()
    }

    #[test]
    fn each_encoding_round_trips_to_the_same_ndjson() {
        let raw: Vec<u8> = lines()
            .iter()
            .flat_map(|l| [&l[..], b"\n"].concat())
            .collect();
        let decode = |c: Compression, body: &[u8]| match c {
            Compression::None => body.to_vec(),
            Compression::Gzip(_) => {
                let mut v = Vec::new();
                flate2::read::GzDecoder::new(body)
                    .read_to_end(&mut v)
                    .unwrap();
                v
            }
            Compression::Zstd => zstd::stream::decode_all(body).unwrap(),
        };
        for c in [Compression::None, Compression::Gzip(6), Compression::Zstd] {
            let body = c
                .ndjson(lines().iter().map(Vec::as_slice), raw.len())
                .unwrap();
            assert_eq!(decode(c, &body), raw, "{c:?}");
            assert_eq!(decode(c, &c.encode(&raw).unwrap()), raw, "{c:?}");
            if c != Compression::None {
                assert!(
                    body.len() * 4 < raw.len(),
                    "{c:?}: {} of {}",
                    body.len(),
                    raw.len()
                );
            }
        }
    }

    #[test]
    fn the_key_takes_none_gzip_or_zstd_and_nothing_else() {
        let d = Compression::None;
        assert_eq!(
            Compression::from_key(None, d, 1).unwrap(),
            Compression::None
        );
        assert_eq!(
            Compression::from_key(Some("gzip"), d, 1).unwrap(),
            Compression::Gzip(1)
        );
        assert_eq!(
            Compression::from_key(Some("zstd"), d, 1).unwrap(),
            Compression::Zstd
        );
        assert_eq!(
            Compression::from_key(Some("brotli"), d, 1).unwrap_err().key,
            "compression"
        );
        assert_eq!(Compression::Zstd.encoding(), "zstd");
    }
}
