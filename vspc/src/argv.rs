//! Command-line option tokens, shared by the two places that walk a command
//! line by hand: [`crate::config`] (which tokens are vspc's own flags) and
//! [`crate::backend_setup`] (which backend declared each leftover option).
//!
//! A token is `--long`, `--long=VALUE`, `-x` or `-xVALUE`; anything else
//! (a bare word, `-` alone) is not an option. An option that takes a value
//! gets it from its inline part if it has one, else from the next token,
//! whatever that looks like (`--backend-args '-m 0640'` works).

/// The name of an option, as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptKey {
    /// `--name` (`--` alone is the empty name).
    Long(String),
    /// `-x`: the first character after the dash.
    Short(char),
}

impl OptKey {
    /// Whether this is the option with this long and short name.
    pub fn is(&self, long: Option<&str>, short: Option<char>) -> bool {
        match self {
            OptKey::Long(l) => long == Some(l.as_str()),
            OptKey::Short(c) => short == Some(*c),
        }
    }
}

/// One option token: its name and the value written into it, if any
/// (`--long=VALUE`: everything after the first `=`; `-xVALUE`: everything
/// after the letter).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptToken {
    pub key: OptKey,
    pub inline: Option<String>,
}

/// Where an option's value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptValue<T> {
    /// Written into the token itself.
    Inline(String),
    /// The next token, taken off the command line.
    Next(T),
    /// Nothing inline and no token left.
    Missing,
}

impl OptToken {
    /// Read `tok` as an option; `None` if it is not one.
    pub fn parse(tok: &str) -> Option<OptToken> {
        if let Some(rest) = tok.strip_prefix("--") {
            let (name, inline) = match rest.split_once('=') {
                Some((k, v)) => (k, Some(v.to_string())),
                None => (rest, None),
            };
            return Some(OptToken {
                key: OptKey::Long(name.to_string()),
                inline,
            });
        }
        let mut chars = tok.strip_prefix('-')?.chars();
        let c = chars.next()?;
        let tail = chars.as_str();
        Some(OptToken {
            key: OptKey::Short(c),
            inline: (!tail.is_empty()).then(|| tail.to_string()),
        })
    }

    /// The value of an option that takes one: the inline part, else the
    /// next token of `rest` (consumed only then).
    pub fn value<T>(self, rest: &mut impl Iterator<Item = T>) -> OptValue<T> {
        match self.inline {
            Some(v) => OptValue::Inline(v),
            None => rest.next().map_or(OptValue::Missing, OptValue::Next),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok(key: OptKey, inline: Option<&str>) -> Option<OptToken> {
        Some(OptToken {
            key,
            inline: inline.map(String::from),
        })
    }

    #[test]
    fn parses_every_form() {
        use OptKey::{Long, Short};
        let long = |s: &str| Long(s.to_string());
        assert_eq!(OptToken::parse("--logdir"), tok(long("logdir"), None));
        assert_eq!(
            OptToken::parse("--prefix=x"),
            tok(long("prefix"), Some("x"))
        );
        // Only the first '=' splits; an empty value is still a value.
        assert_eq!(OptToken::parse("--a=b=c"), tok(long("a"), Some("b=c")));
        assert_eq!(OptToken::parse("--mode="), tok(long("mode"), Some("")));
        assert_eq!(OptToken::parse("--"), tok(long(""), None));
        assert_eq!(OptToken::parse("--=v"), tok(long(""), Some("v")));
        assert_eq!(OptToken::parse("-l"), tok(Short('l'), None));
        assert_eq!(OptToken::parse("-m0640"), tok(Short('m'), Some("0640")));
        assert_eq!(OptToken::parse("-dl"), tok(Short('d'), Some("l")));
        assert_eq!(OptToken::parse("-é=1"), tok(Short('é'), Some("=1")));
        assert_eq!(OptToken::parse("-"), None);
        assert_eq!(OptToken::parse(""), None);
        assert_eq!(OptToken::parse("stray"), None);
        assert_eq!(OptToken::parse("a-b"), None);
    }

    #[test]
    fn keys_match_long_or_short() {
        let spec = (Some("logdir"), Some('l'));
        assert!(OptKey::Long("logdir".into()).is(spec.0, spec.1));
        assert!(OptKey::Short('l').is(spec.0, spec.1));
        assert!(!OptKey::Long("l".into()).is(spec.0, spec.1));
        assert!(!OptKey::Short('d').is(spec.0, spec.1));
        assert!(!OptKey::Short('l').is(Some("logdir"), None));
        assert!(!OptKey::Long(String::new()).is(None, Some('l')));
    }

    #[test]
    fn value_is_inline_or_the_next_token() {
        let mut rest = ["next", "after"].into_iter();
        let v = OptToken::parse("--prefix=p").unwrap().value(&mut rest);
        assert_eq!(v, OptValue::Inline("p".into()));
        let v = OptToken::parse("-m0640").unwrap().value(&mut rest);
        assert_eq!(v, OptValue::Inline("0640".into()));
        assert_eq!(rest.len(), 2, "an inline value takes no token");
        let v = OptToken::parse("--mode=").unwrap().value(&mut rest);
        assert_eq!(v, OptValue::Inline(String::new()));
        let v = OptToken::parse("-l").unwrap().value(&mut rest);
        assert_eq!(v, OptValue::Next("next"));
        let v = OptToken::parse("--context").unwrap().value(&mut rest);
        assert_eq!(v, OptValue::Next("after"));
        let v = OptToken::parse("--context").unwrap().value(&mut rest);
        assert_eq!(v, OptValue::Missing);
        // The next token is the value whatever it looks like.
        let mut rest = ["-m 0640 --context 5"].into_iter();
        let v = OptToken::parse("--backend-args").unwrap().value(&mut rest);
        assert_eq!(v, OptValue::Next("-m 0640 --context 5"));
    }
}
