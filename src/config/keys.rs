//! Values from the config that are keys: `Secret` (never printed), `CurveKey` (Z85, checked by
//! libzmq's own decoder) and the CURVE allowlist file.

use std::fmt;
use std::path::Path;

use super::ConfigError;

/// A value that must never reach a log line, an error or metrics.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(pub(super) String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { "\"***\"" })
    }
}

/// A CURVE key, 32 raw bytes (decoded from 40 Z85 characters).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CurveKey(pub [u8; 32]);

impl fmt::Debug for CurveKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CurveKey(..)")
    }
}

const Z85_ALPHABET: &str =
    "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#";

impl CurveKey {
    /// Decodes 40 Z85 characters. The reason never contains the text (it may be a secret).
    pub fn from_z85(text: &str) -> Result<CurveKey, String> {
        if text.len() != 40 {
            return Err(format!(
                "a Z85 key is 40 characters, this one has {}",
                text.len()
            ));
        }
        if !text.chars().all(|c| Z85_ALPHABET.contains(c)) {
            return Err("has characters outside the Z85 alphabet".to_string());
        }
        crate::zmq_ffi::z85_decode_key(text)
            .map(CurveKey)
            .ok_or_else(|| "not valid Z85 (a group of 5 characters is over 2^32 - 1)".to_string())
    }

    pub fn to_z85(&self) -> String {
        zmq::z85_encode(&self.0).unwrap_or_default()
    }
}

/// Reads a CURVE allowlist: one Z85 public key per line, `#` comments and blank lines allowed.
pub fn read_allow_list(path: &Path) -> Result<Vec<CurveKey>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
        file: path.to_path_buf(),
        error,
    })?;
    let mut keys = Vec::new();
    for (i, line) in text.lines().enumerate() {
        // `#` is a Z85 character, so a comment starts a line or follows whitespace.
        let mut words = line.split_whitespace();
        let Some(word) = words.next().filter(|w| !w.starts_with('#')) else {
            continue;
        };
        if words.next().is_some_and(|w| !w.starts_with('#')) {
            return Err(ConfigError::AllowList {
                file: path.to_path_buf(),
                line: i + 1,
                reason: "one key per line (a comment after it starts with #)".into(),
            });
        }
        let key = CurveKey::from_z85(word).map_err(|reason| ConfigError::AllowList {
            file: path.to_path_buf(),
            line: i + 1,
            reason: format!("not a Z85 public key: {reason}"),
        })?;
        keys.push(key);
    }
    keys.sort();
    keys.dedup();
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn z85_round_trip() {
        let pair = zmq::CurveKeyPair::new().unwrap();
        let text = zmq::z85_encode(&pair.secret_key).unwrap();
        let key = CurveKey::from_z85(&text).unwrap();
        assert_eq!(key.0, pair.secret_key);
        assert_eq!(key.to_z85(), text);
    }

    /// 40 characters of the alphabet that are no encoding: `#####` is 84 × (85⁴ + … + 1),
    /// over 2^32. zmq 0.9's decoder returned garbage for it.
    #[test]
    fn z85_overflow_is_refused() {
        let e = CurveKey::from_z85(&"#".repeat(40)).unwrap_err();
        assert!(e.contains("not valid Z85"), "{e}");
        let mut text = zmq::z85_encode(&[7u8; 32]).unwrap();
        text.replace_range(35..40, "%%%%%");
        assert!(CurveKey::from_z85(&text).is_err());
        assert!(CurveKey::from_z85(&"~".repeat(40))
            .unwrap_err()
            .contains("outside the Z85 alphabet"));
    }

    #[test]
    fn secret_debug_is_masked() {
        assert_eq!(format!("{:?}", Secret("x".into())), "\"***\"");
        assert_eq!(format!("{:?}", Secret::default()), "\"\"");
    }
}
