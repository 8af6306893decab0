//! The `streamN.txt` capture fixtures: one line per TCP segment,
//! `vm> <hex>` or `<vspc <hex>`.

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// True for `vm>` (VM to proxy), false for `<vspc`.
    pub from_vm: bool,
    /// The raw payload, IAC escaping included.
    pub bytes: Vec<u8>,
}

/// Parse a fixture. Blank lines and lines starting with `#` are skipped.
pub fn parse(text: &str) -> Result<Vec<Segment>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (from_vm, hex) = if let Some(rest) = line.strip_prefix("vm>") {
            (true, rest.trim())
        } else if let Some(rest) = line.strip_prefix("<vspc") {
            (false, rest.trim())
        } else {
            return Err(format!("line {}: no `vm>` or `<vspc` prefix", n + 1));
        };
        let bytes = unhex(hex).ok_or_else(|| format!("line {}: bad hex", n + 1))?;
        out.push(Segment { from_vm, bytes });
    }
    Ok(out)
}

/// Decode lowercase or uppercase hex without separators.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    let pairs = s.as_bytes().chunks_exact(2);
    if !pairs.remainder().is_empty() {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    pairs
        .map(|p| Some(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
}
