//! A reader of Python's `dbm.dumb` (Python 2's `dumbdbm`): `PREFIX.dir` is
//! text, one record a line, `KEY, (OFFSET, SIZE)` where KEY is the Python
//! `repr` of the key as a Latin-1 string; the value is the SIZE bytes at
//! OFFSET in `PREFIX.dat`. A later line for the same key wins, as in Python.
//! `PREFIX.bak` is the previous `.dir`, which nothing here needs.

use super::gdbm::{MAX_KEY, MAX_RECORDS, MAX_VALUE};
use std::collections::BTreeMap;

/// A key and its value in the `.dat` file.
pub type Pair<'a> = (Vec<u8>, &'a [u8]);

/// What is wrong, and whether the `.dir` file (true) or the `.dat` file is at fault.
pub type Fault = (bool, String);

/// Every (key, value) of a `dbm.dumb` store: `dir` is the `.dir` file's
/// bytes, `dat` the `.dat` file's. The error names the file at fault: it
/// is `Err((true, what))` for the `.dir` file, `Err((false, what))` for
/// the `.dat` file, `what` phrased to follow the file's name.
pub fn read<'a>(dir: &[u8], dat: &'a [u8]) -> Result<Vec<Pair<'a>>, Fault> {
    let mut index: BTreeMap<Vec<u8>, (usize, usize, usize)> = BTreeMap::new();
    for (n, line) in dir.split(|&b| b == b'\n').enumerate() {
        let n = n + 1;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let (key, pos, size) = parse_line(line).map_err(|e| (true, format!("line {n}: {e}")))?;
        if key.len() > MAX_KEY {
            return Err((true, format!("line {n}: a {}-byte key", key.len())));
        }
        if size > MAX_VALUE {
            return Err((
                true,
                format!(
                    "line {n}: a {size}-byte value, more than the {MAX_VALUE} bytes a VM's \
                     record can need"
                ),
            ));
        }
        if index.len() >= MAX_RECORDS && !index.contains_key(&key) {
            return Err((true, format!("holds more than {MAX_RECORDS} records")));
        }
        index.insert(key, (pos, size, n));
    }
    let mut out = Vec::with_capacity(index.len());
    for (key, (pos, size, n)) in index {
        let value = pos
            .checked_add(size)
            .and_then(|end| dat.get(pos..end))
            .ok_or_else(|| {
                (
                    false,
                    format!(
                        "is truncated or corrupt (line {n} of the .dir file puts a {size}-byte \
                         value at offset {pos}, outside the {}-byte file)",
                        dat.len()
                    ),
                )
            })?;
        out.push((key, value));
    }
    Ok(out)
}

/// `'key', (12, 34)` -> (key bytes, 12, 34).
fn parse_line(line: &[u8]) -> Result<(Vec<u8>, usize, usize), String> {
    let mut p = Parser { s: line, at: 0 };
    p.space();
    let key = p.py_str()?;
    p.space();
    p.expect(b',')?;
    p.space();
    p.expect(b'(')?;
    p.space();
    let pos = p.int()?;
    p.space();
    p.expect(b',')?;
    p.space();
    let size = p.int()?;
    p.space();
    p.expect(b')')?;
    p.space();
    if p.at != line.len() {
        return Err(format!(
            "unexpected text after the record at column {}",
            p.at + 1
        ));
    }
    Ok((key, pos, size))
}

struct Parser<'a> {
    s: &'a [u8],
    at: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.at).copied()
    }

    fn space(&mut self) {
        while self.peek().is_some_and(|b| b == b' ' || b == b'\t') {
            self.at += 1;
        }
    }

    fn expect(&mut self, want: u8) -> Result<(), String> {
        match self.peek() {
            Some(b) if b == want => {
                self.at += 1;
                Ok(())
            }
            Some(b) => Err(format!(
                "expected '{}' at column {}, found {:?}",
                want as char,
                self.at + 1,
                b as char
            )),
            None => Err(format!(
                "expected '{}' at column {}, found the end of the line",
                want as char,
                self.at + 1
            )),
        }
    }

    /// A non-negative integer, with Python 2's `L` suffix allowed.
    fn int(&mut self) -> Result<usize, String> {
        let start = self.at;
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.at += 1;
        }
        let digits = &self.s[start..self.at];
        if digits.is_empty() {
            return Err(format!("expected a number at column {}", start + 1));
        }
        if self.peek() == Some(b'L') {
            self.at += 1;
        }
        std::str::from_utf8(digits)
            .ok()
            .and_then(|d| d.parse::<usize>().ok())
            .ok_or_else(|| format!("number at column {} is too large", start + 1))
    }

    /// A Python string literal (`'...'` or `"..."`, an optional `u` or `b`
    /// prefix) whose characters are all Latin-1: its bytes.
    fn py_str(&mut self) -> Result<Vec<u8>, String> {
        if matches!(self.peek(), Some(b'u' | b'b' | b'U' | b'B')) {
            self.at += 1;
        }
        let quote = match self.peek() {
            Some(q @ (b'\'' | b'"')) => q,
            _ => return Err(format!("expected a quoted key at column {}", self.at + 1)),
        };
        self.at += 1;
        let mut out = Vec::new();
        loop {
            let Some(b) = self.peek() else {
                return Err("the key's closing quote is missing".into());
            };
            self.at += 1;
            if b == quote {
                return Ok(out);
            }
            if b != b'\\' {
                // The file is Latin-1: every byte is one character.
                out.push(b);
                continue;
            }
            let Some(e) = self.peek() else {
                return Err("the key ends with a lone backslash".into());
            };
            self.at += 1;
            match e {
                b'\\' | b'\'' | b'"' => out.push(e),
                b'n' => out.push(b'\n'),
                b'r' => out.push(b'\r'),
                b't' => out.push(b'\t'),
                b'a' => out.push(7),
                b'b' => out.push(8),
                b'f' => out.push(12),
                b'v' => out.push(11),
                b'0'..=b'7' => {
                    let mut v = u32::from(e - b'0');
                    for _ in 0..2 {
                        match self.peek() {
                            Some(d @ b'0'..=b'7') => {
                                self.at += 1;
                                v = v * 8 + u32::from(d - b'0');
                            }
                            _ => break,
                        }
                    }
                    out.push(latin1(v, self.at)?);
                }
                b'x' => out.push(latin1(self.hex(2)?, self.at)?),
                b'u' => out.push(latin1(self.hex(4)?, self.at)?),
                b'U' => out.push(latin1(self.hex(8)?, self.at)?),
                other => {
                    return Err(format!(
                        "unknown escape \\{} at column {}",
                        other as char, self.at
                    ))
                }
            }
        }
    }

    fn hex(&mut self, digits: usize) -> Result<u32, String> {
        let mut v: u32 = 0;
        for _ in 0..digits {
            let d = self
                .peek()
                .and_then(|b| (b as char).to_digit(16))
                .ok_or_else(|| format!("bad escape in the key at column {}", self.at + 1))?;
            self.at += 1;
            v = v.wrapping_mul(16).wrapping_add(d);
        }
        Ok(v)
    }
}

fn latin1(v: u32, at: usize) -> Result<u8, String> {
    u8::try_from(v).map_err(|_| {
        format!("the key has character U+{v:04X} (column {at}), which dbm.dumb never writes")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_as_python_writes_them() {
        let dat = b"abcdefgh";
        // 512 is outside the file: that is the .dat's fault.
        let (is_dir, err) = read(b"'u1', (0, 3)\n\"it's\", (512L, 2)\n", dat).unwrap_err();
        assert!(!is_dir, "{err}");
        let dir = b"'u1', (0, 3)\n\"it's\", (5L, 2)\n'\\xe9\\n\\\\\\'', (3, 1)\n'u1', (4, 1)\n";
        let want: Vec<(Vec<u8>, &[u8])> = vec![
            (b"it's".to_vec(), b"fg"),
            (b"u1".to_vec(), b"e"),
            (b"\xe9\n\\'".to_vec(), b"d"),
        ];
        assert_eq!(read(dir, dat).unwrap(), want);
    }

    #[test]
    fn bad_lines_name_the_line_and_the_file() {
        let cases: &[(&[u8], &str)] = &[
            (b"u1, (0, 1)\n", "line 1: expected a quoted key"),
            (b"'u1', (0, 1)\n'u2' (0, 1)\n", "line 2: expected ','"),
            (b"'u1', (0, x)\n", "expected a number"),
            (b"'u1', (0, 1) junk\n", "unexpected text"),
            (b"'u1, (0, 1)\n", "closing quote"),
            (b"'\\q', (0, 1)\n", "unknown escape"),
            (b"'\\u0100', (0, 1)\n", "U+0100"),
            (b"'u', (0, 99999999999999999999999)\n", "too large"),
            (b"'u', (0, 99999999)\n", "-byte value"),
        ];
        for (dir, want) in cases {
            let (is_dir, err) = read(dir, b"x").unwrap_err();
            assert!(is_dir, "{err}");
            assert!(err.contains(want), "{err} lacks {want}");
        }
        let (is_dir, err) = read(b"'u', (1, 5)\n", b"xy").unwrap_err();
        assert!(!is_dir);
        assert!(
            err.contains("offset 1") && err.contains("2-byte file"),
            "{err}"
        );
        let (_, err) = read(b"'u', (18446744073709551615, 5)\n", b"xy").unwrap_err();
        assert!(err.contains("outside"), "{err}");
    }
}
