//! Secrets that cannot be printed by accident.

use std::fmt;

/// A value that must never reach a log, an error message or a response.
///
/// `Debug` and `Display` print `***`; the only way to the value is [`Secret::expose`],
/// so every place that uses the secret is easy to find.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    /// Wraps a secret value.
    pub fn new(value: T) -> Self {
        Self(value)
    }

    /// The secret itself; call it only where the value leaves for Zoho or the token file.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl Secret<String> {
    /// The secret masked except its last 4 characters (`…abcd`), for operators to tell
    /// secrets apart. Short secrets are masked whole.
    pub fn masked(&self) -> String {
        let chars: Vec<char> = self.0.chars().collect();
        if chars.len() < 12 {
            return "***".to_owned();
        }
        let tail: String = chars[chars.len() - 4..].iter().collect();
        format!("…{tail}")
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl<T> fmt::Display for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl From<String> for Secret<String> {
    fn from(value: String) -> Self {
        Self(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_hide_the_value() {
        let s = Secret::new("1000.abcdef.123456".to_owned());
        assert_eq!(format!("{s:?}"), "***");
        assert_eq!(format!("{s}"), "***");
        assert_eq!(format!("{:?}", Some(&s)), "Some(***)");
    }

    #[test]
    fn masked_shows_only_the_last_four() {
        assert_eq!(
            Secret::new("1000.abcdef.123456".to_owned()).masked(),
            "…3456"
        );
        assert_eq!(Secret::new("short".to_owned()).masked(), "***");
    }
}
