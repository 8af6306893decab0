//! Safe reader and writer for the small subset of Python's pickle format that
//! vSPC.py's admin "query protocol" speaks.
//!
//! This module owns everything byte-level about that protocol: finding where
//! one pickle ends in a stream of back-to-back pickles (there is no length
//! prefix, so the opcodes have to be parsed up to STOP), turning it into a
//! plain [`Value`] ([`decode`], or the incremental [`Decoder`]), and writing
//! replies as protocol-2 pickles ([`encode`]). Unlike Python's unpickler it
//! never imports or calls anything: it only understands opcodes that build
//! plain values and refuses every opcode that would look up a global, call
//! it, build an object or consult a persistent-id or extension hook. The one
//! exception is the `Exception("message")` pattern, which is recognised
//! structurally and becomes [`Value::Exception`] without running any code.
//! Every length and index read from the input is checked, and nesting depth,
//! element count, memo size and total string bytes are bounded, so hostile
//! network input can make decoding fail but cannot make it panic, allocate
//! without limit or overflow the stack.

use std::collections::HashMap;

/// Deepest container nesting a decoded value may have (and the most MARKs
/// that may be open at once).
pub const MAX_DEPTH: usize = 64;

/// Most values one pickle may push while decoding, and most elements the
/// decoded [`Value`] may contain (counting every copy of shared parts).
pub const MAX_ELEMENTS: usize = 100_000;

/// Most distinct memo entries one pickle may define.
const MAX_MEMO: usize = 100_000;

/// Total string/bytes payload a decoded value may hold is
/// `max(max_len, MIN_BYTE_BUDGET) * BYTE_BUDGET_FACTOR`; the factor leaves
/// room for the memo sharing Python uses for repeated strings while stopping
/// a few-byte GET from copying a large string many times.
const MIN_BYTE_BUDGET: usize = 64 * 1024;
const BYTE_BUDGET_FACTOR: usize = 4;

/// Newest pickle protocol this reader knows.
const HIGHEST_PROTOCOL: u8 = 5;

/// A plain Python value as the query protocol uses them.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    List(Vec<Value>),
    Tuple(Vec<Value>),
    /// Insertion order kept.
    Dict(Vec<(Value, Value)>),
    /// `Exception("msg")` / `builtins.Exception` / py2 `exceptions.Exception` with zero or one str argument.
    Exception(String),
}

impl Value {
    /// What [`encode`] of this value decodes back as: `Bytes` travel as
    /// Python 2 `str`, so ones that are valid UTF-8 come back as `Str`.
    pub fn read_back(&self) -> Value {
        let all = |items: &[Value]| items.iter().map(Value::read_back).collect();
        match self {
            Value::Bytes(b) => match std::str::from_utf8(b) {
                Ok(text) => Value::Str(text.to_string()),
                Err(_) => self.clone(),
            },
            Value::List(items) => Value::List(all(items)),
            Value::Tuple(items) => Value::Tuple(all(items)),
            Value::Dict(items) => Value::Dict(
                items
                    .iter()
                    .map(|(k, v)| (k.read_back(), v.read_back()))
                    .collect(),
            ),
            other => other.clone(),
        }
    }
}

/// Why a byte sequence is not (and can never become) an acceptable pickle.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PickleError {
    /// No STOP opcode within the first `limit` bytes.
    #[error("pickle is longer than {limit} bytes without reaching its STOP opcode")]
    TooLarge { limit: usize },
    /// An opcode that would import, call or build an object.
    #[error("pickle opcode 0x{opcode:02x} ({what}) is refused: only plain values are accepted")]
    Forbidden { opcode: u8, what: String },
    /// Valid pickle, but a feature this reader deliberately lacks (sets,
    /// out-of-band buffers, self-referencing structures).
    #[error("pickle uses an unsupported feature: {0}")]
    Unsupported(String),
    /// A safety bound (nesting depth, element count, memo size, string bytes)
    /// was exceeded.
    #[error("pickle exceeds a safety limit: {0}")]
    TooComplex(String),
    /// Not a valid pickle.
    #[error("malformed pickle: {0}")]
    Malformed(String),
}

/// Decode one complete pickle from the front of `buf`.
/// Ok(None): `buf` holds only a prefix of a pickle so far; call again with more bytes.
/// Ok(Some((value, consumed))): one pickle decoded, `consumed` bytes used (up to and including STOP).
/// Err: the bytes can never become a valid, allowed pickle (including: longer than `max_len` bytes without a STOP -> TooLarge).
///
/// Each call parses `buf` from the start, so feeding a pickle in many tiny
/// pieces costs time quadratic in its length; [`Decoder`] avoids that.
pub fn decode(buf: &[u8], max_len: usize) -> Result<Option<(Value, usize)>, PickleError> {
    Machine::default().run(buf, max_len)
}

/// Incremental form of [`decode`] for one stream: it remembers how far the
/// current pickle has been parsed, so each call only looks at new bytes.
///
/// Contract: after a call returned `Ok(None)`, the next call must be given
/// the same bytes again with more appended. After `Ok(Some(..))` or `Err`
/// the decoder starts afresh, so drop the consumed bytes (or the stream) and
/// call again. Breaking the contract gives wrong results, never a panic.
#[derive(Debug)]
pub struct Decoder {
    max_len: usize,
    machine: Machine,
}

impl Decoder {
    /// A decoder refusing pickles longer than `max_len` bytes.
    pub fn new(max_len: usize) -> Self {
        Decoder {
            max_len,
            machine: Machine::default(),
        }
    }

    /// Same results as [`decode`]`(buf, max_len)`.
    pub fn decode(&mut self, buf: &[u8]) -> Result<Option<(Value, usize)>, PickleError> {
        if buf.len() < self.machine.pos {
            // The caller did not keep the bytes; start over rather than
            // waiting forever for a position that no longer exists.
            self.machine = Machine::default();
        }
        let result = self.machine.run(buf, self.max_len);
        if !matches!(result, Ok(None)) {
            self.machine = Machine::default();
        }
        result
    }
}

/// Pickles sent back to back on one byte stream (vSPC.py's query protocol
/// has no other framing): feed the bytes as they arrive, take each value as
/// it completes. Sans-IO, so the daemon, the simulators and the tests all
/// read pickles the same way.
#[derive(Debug)]
pub struct Stream {
    buf: Vec<u8>,
    decoder: Decoder,
}

impl Stream {
    /// A stream refusing pickles longer than `max_len` bytes.
    pub fn new(max_len: usize) -> Stream {
        Stream {
            buf: Vec::new(),
            decoder: Decoder::new(max_len),
        }
    }

    /// Bytes that arrived.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete value, `None` until more bytes are fed.
    pub fn next_value(&mut self) -> Result<Option<Value>, PickleError> {
        if self.buf.is_empty() {
            return Ok(None);
        }
        match self.decoder.decode(&self.buf)? {
            Some((value, used)) => {
                self.buf.drain(..used);
                Ok(Some(value))
            }
            None => Ok(None),
        }
    }

    /// The bytes after the last value taken (a console session that
    /// follows the pickles starts with them).
    pub fn take_rest(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }
}

/// Encode `value` as a protocol-2 pickle (PROTO 2 ... STOP), the form every Python 2.3+ and 3.x `pickle.load` reads.
pub fn encode(value: &Value) -> Vec<u8> {
    let mut out = vec![op::PROTO, 2];
    write_value(&mut out, value);
    out.push(op::STOP);
    out
}

/// Pickle opcodes (names as in CPython's `pickle.py`).
mod op {
    pub const MARK: u8 = b'(';
    pub const STOP: u8 = b'.';
    pub const POP: u8 = b'0';
    pub const POP_MARK: u8 = b'1';
    pub const DUP: u8 = b'2';
    pub const FLOAT: u8 = b'F';
    pub const INT: u8 = b'I';
    pub const BININT: u8 = b'J';
    pub const BININT1: u8 = b'K';
    pub const LONG: u8 = b'L';
    pub const BININT2: u8 = b'M';
    pub const NONE: u8 = b'N';
    pub const PERSID: u8 = b'P';
    pub const BINPERSID: u8 = b'Q';
    pub const REDUCE: u8 = b'R';
    pub const STRING: u8 = b'S';
    pub const BINSTRING: u8 = b'T';
    pub const SHORT_BINSTRING: u8 = b'U';
    pub const UNICODE: u8 = b'V';
    pub const BINUNICODE: u8 = b'X';
    pub const APPEND: u8 = b'a';
    pub const BUILD: u8 = b'b';
    pub const GLOBAL: u8 = b'c';
    pub const DICT: u8 = b'd';
    pub const EMPTY_DICT: u8 = b'}';
    pub const APPENDS: u8 = b'e';
    pub const GET: u8 = b'g';
    pub const BINGET: u8 = b'h';
    pub const INST: u8 = b'i';
    pub const LONG_BINGET: u8 = b'j';
    pub const LIST: u8 = b'l';
    pub const EMPTY_LIST: u8 = b']';
    pub const OBJ: u8 = b'o';
    pub const PUT: u8 = b'p';
    pub const BINPUT: u8 = b'q';
    pub const LONG_BINPUT: u8 = b'r';
    pub const SETITEM: u8 = b's';
    pub const TUPLE: u8 = b't';
    pub const EMPTY_TUPLE: u8 = b')';
    pub const SETITEMS: u8 = b'u';
    pub const BINFLOAT: u8 = b'G';
    pub const PROTO: u8 = 0x80;
    pub const NEWOBJ: u8 = 0x81;
    pub const EXT1: u8 = 0x82;
    pub const EXT2: u8 = 0x83;
    pub const EXT4: u8 = 0x84;
    pub const TUPLE1: u8 = 0x85;
    pub const TUPLE2: u8 = 0x86;
    pub const TUPLE3: u8 = 0x87;
    pub const NEWTRUE: u8 = 0x88;
    pub const NEWFALSE: u8 = 0x89;
    pub const LONG1: u8 = 0x8a;
    pub const LONG4: u8 = 0x8b;
    pub const BINBYTES: u8 = b'B';
    pub const SHORT_BINBYTES: u8 = b'C';
    pub const SHORT_BINUNICODE: u8 = 0x8c;
    pub const BINUNICODE8: u8 = 0x8d;
    pub const BINBYTES8: u8 = 0x8e;
    pub const EMPTY_SET: u8 = 0x8f;
    pub const ADDITEMS: u8 = 0x90;
    pub const FROZENSET: u8 = 0x91;
    pub const NEWOBJ_EX: u8 = 0x92;
    pub const STACK_GLOBAL: u8 = 0x93;
    pub const MEMOIZE: u8 = 0x94;
    pub const FRAME: u8 = 0x95;
    pub const BYTEARRAY8: u8 = 0x96;
    pub const NEXT_BUFFER: u8 = 0x97;
    pub const READONLY_BUFFER: u8 = 0x98;
}

/// Name of an opcode that is refused or unsupported without further detail.
fn opcode_name(opcode: u8) -> &'static str {
    match opcode {
        op::PERSID => "PERSID",
        op::BINPERSID => "BINPERSID",
        op::BUILD => "BUILD",
        op::OBJ => "OBJ",
        op::NEWOBJ => "NEWOBJ",
        op::NEWOBJ_EX => "NEWOBJ_EX",
        op::EXT1 => "EXT1",
        op::EXT2 => "EXT2",
        op::EXT4 => "EXT4",
        op::EMPTY_SET => "EMPTY_SET",
        op::ADDITEMS => "ADDITEMS",
        op::FROZENSET => "FROZENSET",
        op::NEXT_BUFFER => "NEXT_BUFFER",
        op::READONLY_BUFFER => "READONLY_BUFFER",
        _ => "opcode",
    }
}

// ---------------------------------------------------------------------------
// Reader
// ---------------------------------------------------------------------------

/// Why one opcode could not be executed.
enum Halt {
    /// The opcode (or its argument) continues past the end of the buffer.
    NeedMore,
    Fail(PickleError),
}

impl From<PickleError> for Halt {
    fn from(e: PickleError) -> Self {
        Halt::Fail(e)
    }
}

fn malformed(msg: impl Into<String>) -> Halt {
    Halt::Fail(PickleError::Malformed(msg.into()))
}

fn too_complex(msg: impl Into<String>) -> Halt {
    Halt::Fail(PickleError::TooComplex(msg.into()))
}

fn forbidden(opcode: u8, what: impl Into<String>) -> Halt {
    Halt::Fail(PickleError::Forbidden {
        opcode,
        what: what.into(),
    })
}

/// Bounds-checked reading of opcode arguments from the first `max_len`
/// bytes of the buffer.
struct Cursor<'a> {
    win: &'a [u8],
    pos: usize,
    max_len: usize,
}

impl<'a> Cursor<'a> {
    /// The next `n` bytes. Never allocates: a length claiming more than
    /// `max_len` allows fails at once, one claiming more than has arrived
    /// just asks for more.
    fn take(&mut self, n: usize) -> Result<&'a [u8], Halt> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.max_len)
            .ok_or(Halt::Fail(PickleError::TooLarge {
                limit: self.max_len,
            }))?;
        let bytes = self.win.get(self.pos..end).ok_or(Halt::NeedMore)?;
        self.pos = end;
        Ok(bytes)
    }

    fn take_u64(&mut self, n: u64) -> Result<&'a [u8], Halt> {
        let n = usize::try_from(n).map_err(|_| {
            Halt::Fail(PickleError::TooLarge {
                limit: self.max_len,
            })
        })?;
        self.take(n)
    }

    fn byte(&mut self) -> Result<u8, Halt> {
        self.take(1)?.first().copied().ok_or(Halt::NeedMore)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], Halt> {
        <[u8; N]>::try_from(self.take(N)?).map_err(|_| malformed("internal length error"))
    }

    /// The bytes up to the next `\n` (which is consumed but not returned).
    fn line(&mut self) -> Result<&'a [u8], Halt> {
        let rest = self.win.get(self.pos..).ok_or(Halt::NeedMore)?;
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or(Halt::NeedMore)?;
        let line = rest.get(..n).ok_or(Halt::NeedMore)?;
        self.pos = self.pos.saturating_add(n).saturating_add(1);
        Ok(line)
    }
}

/// One object built while decoding. Containers refer to other nodes by
/// index, so memo sharing and in-place mutation (APPEND to a list that was
/// memoised while empty) behave as in Python without copying anything.
#[derive(Debug)]
enum Node {
    /// None, Bool, Int, Float, Str, Bytes or Exception.
    Leaf(Value),
    List(Vec<usize>),
    Tuple(Vec<usize>),
    Dict(Vec<(usize, usize)>),
    /// The `Exception` class, only good as the callee of REDUCE.
    ExceptionClass,
}

/// Running totals while turning nodes into a [`Value`].
struct Budget {
    elements: usize,
    bytes: usize,
    byte_limit: usize,
}

/// The unpickling machine. Each opcode reads all of its argument bytes
/// before changing any state, so when an opcode runs past the end of the
/// buffer the machine can simply be resumed at that opcode later.
#[derive(Debug, Default)]
struct Machine {
    /// Offset of the next opcode.
    pos: usize,
    nodes: Vec<Node>,
    stack: Vec<usize>,
    /// Stack lengths at each open MARK.
    marks: Vec<usize>,
    memo: HashMap<u64, usize>,
    /// Values pushed so far (bounded by [`MAX_ELEMENTS`]).
    pushes: usize,
}

impl Machine {
    fn run(&mut self, buf: &[u8], max_len: usize) -> Result<Option<(Value, usize)>, PickleError> {
        let win = buf.get(..max_len).unwrap_or(buf);
        loop {
            let mut cursor = Cursor {
                win,
                pos: self.pos,
                max_len,
            };
            match self.step(&mut cursor, max_len) {
                Ok(None) => self.pos = cursor.pos,
                Ok(Some(value)) => return Ok(Some((value, cursor.pos))),
                Err(Halt::NeedMore) if win.len() >= max_len => {
                    return Err(PickleError::TooLarge { limit: max_len })
                }
                Err(Halt::NeedMore) => return Ok(None),
                Err(Halt::Fail(e)) => return Err(e),
            }
        }
    }

    /// Execute one opcode; `Some` once STOP has produced the value.
    fn step(&mut self, c: &mut Cursor<'_>, max_len: usize) -> Result<Option<Value>, Halt> {
        let start = c.pos;
        let opcode = c.byte()?;
        match opcode {
            op::STOP => return self.finish(max_len).map(Some).map_err(Halt::Fail),
            op::PROTO => {
                let version = c.byte()?;
                if version > HIGHEST_PROTOCOL {
                    return Err(malformed(format!("unsupported pickle protocol {version}")));
                }
            }
            op::FRAME => {
                // Framing is only a read-ahead hint; its length is ignored.
                c.take(8)?;
            }

            op::NONE => self.push_value(Value::None)?,
            op::NEWTRUE => self.push_value(Value::Bool(true))?,
            op::NEWFALSE => self.push_value(Value::Bool(false))?,
            op::INT => {
                let value = parse_int_line(c.line()?)?;
                self.push_value(value)?;
            }
            op::BININT => {
                let n = i32::from_le_bytes(c.array()?);
                self.push_value(Value::Int(n.into()))?;
            }
            op::BININT1 => {
                let n = c.byte()?;
                self.push_value(Value::Int(n.into()))?;
            }
            op::BININT2 => {
                let n = u16::from_le_bytes(c.array()?);
                self.push_value(Value::Int(n.into()))?;
            }
            op::LONG => {
                let line = c.line()?;
                let digits = line.strip_suffix(b"L").unwrap_or(line);
                let n = parse_i64("LONG", digits)?;
                self.push_value(Value::Int(n))?;
            }
            op::LONG1 => {
                let len = c.byte()?;
                let n = le_signed(c.take(len.into())?)?;
                self.push_value(Value::Int(n))?;
            }
            op::LONG4 => {
                let len = i32::from_le_bytes(c.array()?);
                let len = usize::try_from(len)
                    .map_err(|_| malformed("LONG4 has a negative byte count"))?;
                // Anything much longer than 8 bytes cannot be an i64 the
                // way Python writes it; refuse before waiting for the bytes.
                if len > 16 {
                    return Err(malformed(format!(
                        "LONG4 integer of {len} bytes is outside the 64-bit range"
                    )));
                }
                let n = le_signed(c.take(len)?)?;
                self.push_value(Value::Int(n))?;
            }
            op::BINFLOAT => {
                let f = f64::from_be_bytes(c.array()?);
                self.push_value(Value::Float(f))?;
            }
            op::FLOAT => {
                let line = c.line()?;
                let f = std::str::from_utf8(line)
                    .ok()
                    .and_then(|s| s.trim().parse::<f64>().ok())
                    .ok_or_else(|| {
                        malformed(format!("FLOAT argument {} is not a number", show(line)))
                    })?;
                self.push_value(Value::Float(f))?;
            }

            op::STRING => {
                let bytes = escape_decode(unquote(c.line()?)?)?;
                self.push_value(py2_str(bytes))?;
            }
            op::BINSTRING => {
                let len = i32::from_le_bytes(c.array()?);
                let len = usize::try_from(len)
                    .map_err(|_| malformed("BINSTRING has a negative byte count"))?;
                let bytes = c.take(len)?.to_vec();
                self.push_value(py2_str(bytes))?;
            }
            op::SHORT_BINSTRING => {
                let len = c.byte()?;
                let bytes = c.take(len.into())?.to_vec();
                self.push_value(py2_str(bytes))?;
            }
            op::UNICODE => {
                let s = raw_unicode_escape_decode(c.line()?)?;
                self.push_value(Value::Str(s))?;
            }
            op::BINUNICODE => {
                let len = u32::from_le_bytes(c.array()?);
                let s = utf8("BINUNICODE", c.take_u64(len.into())?)?;
                self.push_value(Value::Str(s))?;
            }
            op::SHORT_BINUNICODE => {
                let len = c.byte()?;
                let s = utf8("SHORT_BINUNICODE", c.take(len.into())?)?;
                self.push_value(Value::Str(s))?;
            }
            op::BINUNICODE8 => {
                let len = u64::from_le_bytes(c.array()?);
                let s = utf8("BINUNICODE8", c.take_u64(len)?)?;
                self.push_value(Value::Str(s))?;
            }
            op::BINBYTES => {
                let len = u32::from_le_bytes(c.array()?);
                let bytes = c.take_u64(len.into())?.to_vec();
                self.push_value(Value::Bytes(bytes))?;
            }
            op::SHORT_BINBYTES => {
                let len = c.byte()?;
                let bytes = c.take(len.into())?.to_vec();
                self.push_value(Value::Bytes(bytes))?;
            }
            op::BINBYTES8 | op::BYTEARRAY8 => {
                let len = u64::from_le_bytes(c.array()?);
                let bytes = c.take_u64(len)?.to_vec();
                self.push_value(Value::Bytes(bytes))?;
            }

            op::EMPTY_LIST => self.push_node(Node::List(Vec::new()))?,
            op::EMPTY_TUPLE => self.push_node(Node::Tuple(Vec::new()))?,
            op::EMPTY_DICT => self.push_node(Node::Dict(Vec::new()))?,
            op::LIST => {
                let items = self.pop_mark()?;
                self.push_node(Node::List(items))?;
            }
            op::TUPLE => {
                let items = self.pop_mark()?;
                self.push_node(Node::Tuple(items))?;
            }
            op::TUPLE1 | op::TUPLE2 | op::TUPLE3 => {
                let n = usize::from(opcode - op::TUPLE1) + 1;
                let items = self.pop_n(n)?;
                self.push_node(Node::Tuple(items))?;
            }
            op::DICT => {
                let items = self.pop_mark()?;
                self.push_node(Node::Dict(pairs(items)?))?;
            }
            op::APPEND => {
                let item = self.pop()?;
                self.extend_list("APPEND", vec![item])?;
            }
            op::APPENDS => {
                let items = self.pop_mark()?;
                self.extend_list("APPENDS", items)?;
            }
            op::SETITEM => {
                let value = self.pop()?;
                let key = self.pop()?;
                self.extend_dict("SETITEM", vec![(key, value)])?;
            }
            op::SETITEMS => {
                let items = self.pop_mark()?;
                self.extend_dict("SETITEMS", pairs(items)?)?;
            }

            op::MARK => {
                if self.marks.len() >= MAX_DEPTH {
                    return Err(too_complex(format!("more than {MAX_DEPTH} nested MARKs")));
                }
                self.marks.push(self.stack.len());
            }
            op::POP => {
                if self.stack.len() > self.base() {
                    self.stack.pop();
                } else {
                    self.pop_mark()?;
                }
            }
            op::POP_MARK => {
                self.pop_mark()?;
            }
            op::DUP => {
                let top = self.top()?;
                self.push_id(top)?;
            }

            op::PUT => {
                let key = parse_memo_key("PUT", c.line()?)?;
                self.memo_put(key)?;
            }
            op::BINPUT => {
                let key = c.byte()?;
                self.memo_put(key.into())?;
            }
            op::LONG_BINPUT => {
                let key = u32::from_le_bytes(c.array()?);
                self.memo_put(key.into())?;
            }
            op::MEMOIZE => {
                let key =
                    u64::try_from(self.memo.len()).map_err(|_| too_complex("memo too large"))?;
                self.memo_put(key)?;
            }
            op::GET => {
                let key = parse_memo_key("GET", c.line()?)?;
                self.memo_get(key)?;
            }
            op::BINGET => {
                let key = c.byte()?;
                self.memo_get(key.into())?;
            }
            op::LONG_BINGET => {
                let key = u32::from_le_bytes(c.array()?);
                self.memo_get(key.into())?;
            }

            op::GLOBAL => {
                let module = c.line()?;
                let name = c.line()?;
                check_global(opcode, "GLOBAL", module, name)?;
                self.push_node(Node::ExceptionClass)?;
            }
            op::STACK_GLOBAL => {
                let name = self.pop()?;
                let module = self.pop()?;
                match (self.node(module)?, self.node(name)?) {
                    (Node::Leaf(Value::Str(m)), Node::Leaf(Value::Str(n))) => {
                        check_global(opcode, "STACK_GLOBAL", m.as_bytes(), n.as_bytes())?;
                    }
                    _ => {
                        return Err(forbidden(opcode, "STACK_GLOBAL with non-str operands"));
                    }
                }
                self.push_node(Node::ExceptionClass)?;
            }
            op::REDUCE => self.reduce()?,
            op::INST => {
                let module = c.line()?;
                let name = c.line()?;
                return Err(forbidden(
                    opcode,
                    format!("INST {}", describe_global(module, name)),
                ));
            }
            op::PERSID
            | op::BINPERSID
            | op::BUILD
            | op::OBJ
            | op::NEWOBJ
            | op::NEWOBJ_EX
            | op::EXT1
            | op::EXT2
            | op::EXT4 => return Err(forbidden(opcode, opcode_name(opcode))),
            op::EMPTY_SET | op::ADDITEMS | op::FROZENSET => {
                return Err(Halt::Fail(PickleError::Unsupported(format!(
                    "sets (opcode 0x{opcode:02x} {})",
                    opcode_name(opcode)
                ))));
            }
            op::NEXT_BUFFER | op::READONLY_BUFFER => {
                return Err(Halt::Fail(PickleError::Unsupported(format!(
                    "out-of-band buffers (opcode 0x{opcode:02x} {})",
                    opcode_name(opcode)
                ))));
            }
            _ => {
                return Err(malformed(format!(
                    "unknown opcode 0x{opcode:02x} at offset {start}"
                )));
            }
        }
        Ok(None)
    }

    /// Stack length at the innermost open MARK: items below it belong to an
    /// enclosing frame and may not be popped.
    fn base(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn node(&self, id: usize) -> Result<&Node, Halt> {
        self.nodes
            .get(id)
            .ok_or_else(|| malformed("internal: dangling reference"))
    }

    fn push_id(&mut self, id: usize) -> Result<(), Halt> {
        if self.pushes >= MAX_ELEMENTS {
            return Err(too_complex(format!("more than {MAX_ELEMENTS} values")));
        }
        self.pushes += 1;
        self.stack.push(id);
        Ok(())
    }

    fn push_node(&mut self, node: Node) -> Result<(), Halt> {
        let id = self.nodes.len();
        self.push_id(id)?;
        self.nodes.push(node);
        Ok(())
    }

    fn push_value(&mut self, value: Value) -> Result<(), Halt> {
        self.push_node(Node::Leaf(value))
    }

    fn top(&self) -> Result<usize, Halt> {
        if self.stack.len() <= self.base() {
            return Err(malformed("stack underflow"));
        }
        self.stack
            .last()
            .copied()
            .ok_or_else(|| malformed("stack underflow"))
    }

    fn pop(&mut self) -> Result<usize, Halt> {
        if self.stack.len() <= self.base() {
            return Err(malformed("stack underflow"));
        }
        self.stack.pop().ok_or_else(|| malformed("stack underflow"))
    }

    fn pop_n(&mut self, n: usize) -> Result<Vec<usize>, Halt> {
        let at = self
            .stack
            .len()
            .checked_sub(n)
            .filter(|&at| at >= self.base())
            .ok_or_else(|| malformed("stack underflow"))?;
        Ok(self.stack.split_off(at))
    }

    fn pop_mark(&mut self) -> Result<Vec<usize>, Halt> {
        let base = self
            .marks
            .pop()
            .ok_or_else(|| malformed("opcode needs a MARK but none is open"))?;
        if base > self.stack.len() {
            return Err(malformed("internal: MARK beyond the stack"));
        }
        Ok(self.stack.split_off(base))
    }

    fn extend_list(&mut self, what: &str, items: Vec<usize>) -> Result<(), Halt> {
        let target = self.top()?;
        match self.nodes.get_mut(target) {
            Some(Node::List(list)) => {
                list.extend(items);
                Ok(())
            }
            _ => Err(malformed(format!("{what} target is not a list"))),
        }
    }

    fn extend_dict(&mut self, what: &str, items: Vec<(usize, usize)>) -> Result<(), Halt> {
        let target = self.top()?;
        match self.nodes.get_mut(target) {
            Some(Node::Dict(dict)) => {
                dict.extend(items);
                Ok(())
            }
            _ => Err(malformed(format!("{what} target is not a dict"))),
        }
    }

    fn memo_put(&mut self, key: u64) -> Result<(), Halt> {
        let top = self.top()?;
        if !self.memo.contains_key(&key) && self.memo.len() >= MAX_MEMO {
            return Err(too_complex(format!("more than {MAX_MEMO} memo entries")));
        }
        self.memo.insert(key, top);
        Ok(())
    }

    fn memo_get(&mut self, key: u64) -> Result<(), Halt> {
        let id = self
            .memo
            .get(&key)
            .copied()
            .ok_or_else(|| malformed(format!("memo key {key} is not defined")))?;
        self.push_id(id)
    }

    /// REDUCE is only allowed as `Exception(*args)` with args `()` or `(str,)`.
    fn reduce(&mut self) -> Result<(), Halt> {
        let args = self.pop()?;
        let callee = self.pop()?;
        if !matches!(self.node(callee)?, Node::ExceptionClass) {
            return Err(forbidden(
                op::REDUCE,
                "REDUCE calling something other than Exception",
            ));
        }
        let message = match self.node(args)? {
            Node::Tuple(items) => match items.as_slice() {
                [] => Some(String::new()),
                [only] => match self.node(*only)? {
                    Node::Leaf(Value::Str(s)) => Some(s.clone()),
                    _ => None,
                },
                _ => None,
            },
            _ => None,
        };
        let message = message.ok_or_else(|| {
            forbidden(
                op::REDUCE,
                "REDUCE Exception with arguments other than one str",
            )
        })?;
        self.push_value(Value::Exception(message))
    }

    /// STOP: exactly one value must be on the stack, with no MARK open.
    fn finish(&self, max_len: usize) -> Result<Value, PickleError> {
        if !self.marks.is_empty() {
            return Err(PickleError::Malformed(
                "STOP while a MARK is still open".into(),
            ));
        }
        let [root] = self.stack.as_slice() else {
            return Err(PickleError::Malformed(format!(
                "STOP with {} values on the stack instead of 1",
                self.stack.len()
            )));
        };
        let mut budget = Budget {
            elements: 0,
            bytes: 0,
            byte_limit: max_len
                .max(MIN_BYTE_BUDGET)
                .saturating_mul(BYTE_BUDGET_FACTOR),
        };
        let mut active = vec![false; self.nodes.len()];
        self.build(*root, 0, &mut budget, &mut active)
    }

    /// Turn node `id` into a [`Value`]. Recursion is bounded by
    /// [`MAX_DEPTH`]; `active` marks the containers on the current path so
    /// self-references are reported instead of expanded.
    fn build(
        &self,
        id: usize,
        depth: usize,
        budget: &mut Budget,
        active: &mut [bool],
    ) -> Result<Value, PickleError> {
        budget.elements += 1;
        if budget.elements > MAX_ELEMENTS {
            return Err(PickleError::TooComplex(format!(
                "the value would have more than {MAX_ELEMENTS} elements"
            )));
        }
        let node = self
            .nodes
            .get(id)
            .ok_or_else(|| PickleError::Malformed("internal: dangling reference".into()))?;
        match node {
            Node::Leaf(value) => {
                let len = match value {
                    Value::Str(s) | Value::Exception(s) => s.len(),
                    Value::Bytes(b) => b.len(),
                    _ => 0,
                };
                budget.bytes = budget.bytes.saturating_add(len);
                if budget.bytes > budget.byte_limit {
                    return Err(PickleError::TooComplex(format!(
                        "the value would hold more than {} bytes of strings",
                        budget.byte_limit
                    )));
                }
                return Ok(value.clone());
            }
            Node::ExceptionClass => {
                return Err(PickleError::Forbidden {
                    opcode: op::GLOBAL,
                    what: "a reference to Exception not called as Exception(...)".into(),
                });
            }
            Node::List(_) | Node::Tuple(_) | Node::Dict(_) => {}
        }
        if depth >= MAX_DEPTH {
            return Err(PickleError::TooComplex(format!(
                "containers nested deeper than {MAX_DEPTH} levels"
            )));
        }
        match active.get_mut(id) {
            Some(flag) if !*flag => *flag = true,
            Some(_) => {
                return Err(PickleError::Unsupported(
                    "self-referencing (recursive) containers".into(),
                ))
            }
            None => {
                return Err(PickleError::Malformed(
                    "internal: dangling reference".into(),
                ))
            }
        }
        let depth = depth + 1;
        let value = match node {
            Node::List(items) => Value::List(self.build_all(items, depth, budget, active)?),
            Node::Tuple(items) => Value::Tuple(self.build_all(items, depth, budget, active)?),
            Node::Dict(items) => {
                let mut pairs = Vec::with_capacity(items.len());
                for &(key, value) in items {
                    let key = self.build(key, depth, budget, active)?;
                    let value = self.build(value, depth, budget, active)?;
                    pairs.push((key, value));
                }
                Value::Dict(pairs)
            }
            Node::Leaf(_) | Node::ExceptionClass => Value::None,
        };
        if let Some(flag) = active.get_mut(id) {
            *flag = false;
        }
        Ok(value)
    }

    fn build_all(
        &self,
        items: &[usize],
        depth: usize,
        budget: &mut Budget,
        active: &mut [bool],
    ) -> Result<Vec<Value>, PickleError> {
        let mut out = Vec::with_capacity(items.len());
        for &item in items {
            out.push(self.build(item, depth, budget, active)?);
        }
        Ok(out)
    }
}

/// Accept only the `Exception` class under the names Python 2 and 3 use.
fn check_global(opcode: u8, kind: &str, module: &[u8], name: &[u8]) -> Result<(), Halt> {
    let allowed =
        name == b"Exception" && matches!(module, b"builtins" | b"exceptions" | b"__builtin__");
    if allowed {
        Ok(())
    } else {
        Err(forbidden(
            opcode,
            format!("{kind} {}", describe_global(module, name)),
        ))
    }
}

/// `module.name` made printable and short enough for a one-line message.
fn describe_global(module: &[u8], name: &[u8]) -> String {
    format!("{}.{}", printable(module, 60), printable(name, 60))
}

/// ASCII-escaped, truncated rendering of untrusted bytes.
fn printable(bytes: &[u8], max: usize) -> String {
    let mut out = String::new();
    for &b in bytes.get(..max).unwrap_or(bytes) {
        out.extend(std::ascii::escape_default(b).map(char::from));
    }
    if bytes.len() > max {
        out.push_str("...");
    }
    out
}

/// Quoted, printable rendering of an untrusted argument for messages.
fn show(bytes: &[u8]) -> String {
    format!("\"{}\"", printable(bytes, 40))
}

fn utf8(what: &str, bytes: &[u8]) -> Result<String, Halt> {
    std::str::from_utf8(bytes)
        .map(str::to_owned)
        .map_err(|_| malformed(format!("{what} argument is not valid UTF-8")))
}

/// A Python 2 `str`: text when it is valid UTF-8, bytes otherwise.
fn py2_str(bytes: Vec<u8>) -> Value {
    match String::from_utf8(bytes) {
        Ok(s) => Value::Str(s),
        Err(e) => Value::Bytes(e.into_bytes()),
    }
}

fn parse_i64(what: &str, text: &[u8]) -> Result<i64, Halt> {
    std::str::from_utf8(text)
        .ok()
        .and_then(|s| s.trim().parse::<i64>().ok())
        .ok_or_else(|| {
            malformed(format!(
                "{what} argument {} is not a 64-bit integer",
                show(text)
            ))
        })
}

/// Text INT; Python 2 writes booleans as `I01` / `I00`.
fn parse_int_line(line: &[u8]) -> Result<Value, Halt> {
    match line {
        b"00" => Ok(Value::Bool(false)),
        b"01" => Ok(Value::Bool(true)),
        _ => parse_i64("INT", line).map(Value::Int),
    }
}

fn parse_memo_key(what: &str, line: &[u8]) -> Result<u64, Halt> {
    std::str::from_utf8(line)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .ok_or_else(|| {
            malformed(format!(
                "{what} argument {} is not a memo index",
                show(line)
            ))
        })
}

/// Little-endian two's-complement integer (LONG1/LONG4) that must fit i64.
fn le_signed(bytes: &[u8]) -> Result<i64, Halt> {
    let negative = bytes.last().is_some_and(|&b| b & 0x80 != 0);
    let fill = if negative { 0xff } else { 0x00 };
    let (low, high) = bytes.split_at(bytes.len().min(8));
    // Bytes beyond the eighth must only repeat the sign, and the eighth
    // byte's top bit must agree with it.
    let fits = high.iter().all(|&b| b == fill)
        && (low.len() < 8 || low.last().is_some_and(|&b| (b & 0x80 != 0) == negative));
    if !fits {
        return Err(malformed("integer is outside the 64-bit range"));
    }
    let mut buf = [fill; 8];
    for (slot, &b) in buf.iter_mut().zip(low) {
        *slot = b;
    }
    Ok(i64::from_le_bytes(buf))
}

/// `'abc'` or `"abc"` -> `abc` (the STRING opcode's argument).
fn unquote(line: &[u8]) -> Result<&[u8], Halt> {
    match line {
        [first, inner @ .., last] if first == last && matches!(first, b'\'' | b'"') => Ok(inner),
        _ => Err(malformed(format!(
            "STRING argument {} is not quoted",
            show(line)
        ))),
    }
}

fn hex_digit(b: u8) -> Option<u32> {
    char::from(b).to_digit(16)
}

/// Python's `codecs.escape_decode`, as used for the STRING opcode.
fn escape_decode(data: &[u8]) -> Result<Vec<u8>, Halt> {
    let mut out = Vec::with_capacity(data.len());
    let mut it = data.iter().copied().peekable();
    while let Some(b) = it.next() {
        if b != b'\\' {
            out.push(b);
            continue;
        }
        let Some(c) = it.next() else {
            return Err(malformed("STRING argument ends with a lone backslash"));
        };
        match c {
            b'\n' => {}
            b'\\' | b'\'' | b'"' => out.push(c),
            b'a' => out.push(0x07),
            b'b' => out.push(0x08),
            b'f' => out.push(0x0c),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'v' => out.push(0x0b),
            b'0'..=b'7' => {
                let mut v = u32::from(c - b'0');
                for _ in 0..2 {
                    match it.peek() {
                        Some(&d @ b'0'..=b'7') => {
                            v = v * 8 + u32::from(d - b'0');
                            it.next();
                        }
                        _ => break,
                    }
                }
                // Like Python, octal escapes above \377 wrap to one byte.
                out.push((v & 0xff) as u8);
            }
            b'x' => {
                let hi = it.next().and_then(hex_digit);
                let lo = it.next().and_then(hex_digit);
                match (hi, lo) {
                    (Some(hi), Some(lo)) => out.push(((hi << 4) | lo) as u8),
                    _ => return Err(malformed("invalid \\x escape in STRING argument")),
                }
            }
            other => {
                out.push(b'\\');
                out.push(other);
            }
        }
    }
    Ok(out)
}

/// Python's `raw_unicode_escape` decoding, as used for the UNICODE opcode:
/// bytes are Latin-1 except `\uXXXX` and `\UXXXXXXXX`. Surrogate pairs are
/// combined; lone surrogates cannot be represented and are refused.
fn raw_unicode_escape_decode(data: &[u8]) -> Result<String, Halt> {
    let mut units: Vec<u32> = Vec::with_capacity(data.len());
    let mut it = data.iter().copied();
    while let Some(b) = it.next() {
        if b != b'\\' {
            units.push(b.into());
            continue;
        }
        match it.next() {
            None => units.push(u32::from(b'\\')),
            Some(c @ (b'u' | b'U')) => {
                let digits = if c == b'u' { 4 } else { 8 };
                let mut v: u32 = 0;
                for _ in 0..digits {
                    let d = it
                        .next()
                        .and_then(hex_digit)
                        .ok_or_else(|| malformed("truncated \\uXXXX escape in UNICODE argument"))?;
                    v = (v << 4) | d;
                }
                if v > 0x10_ffff {
                    return Err(malformed("\\U escape beyond U+10FFFF in UNICODE argument"));
                }
                units.push(v);
            }
            Some(c) => {
                units.push(u32::from(b'\\'));
                units.push(c.into());
            }
        }
    }
    let mut out = String::with_capacity(units.len());
    let mut it = units.into_iter().peekable();
    while let Some(u) = it.next() {
        let mut code = u;
        if (0xd800..0xdc00).contains(&u) {
            if let Some(&low) = it.peek() {
                if (0xdc00..0xe000).contains(&low) {
                    it.next();
                    code = 0x1_0000 + ((u - 0xd800) << 10) + (low - 0xdc00);
                }
            }
        }
        let ch = char::from_u32(code)
            .ok_or_else(|| malformed("UNICODE argument contains a lone surrogate"))?;
        out.push(ch);
    }
    Ok(out)
}

/// Pair up SETITEMS/DICT operands.
fn pairs(items: Vec<usize>) -> Result<Vec<(usize, usize)>, Halt> {
    let chunks = items.chunks_exact(2);
    if !chunks.remainder().is_empty() {
        return Err(malformed("odd number of items for a dict"));
    }
    Ok(chunks
        .filter_map(|kv| match kv {
            [k, v] => Some((*k, *v)),
            _ => None,
        })
        .collect())
}

// ---------------------------------------------------------------------------
// Writer
// ---------------------------------------------------------------------------

fn write_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::None => out.push(op::NONE),
        Value::Bool(true) => out.push(op::NEWTRUE),
        Value::Bool(false) => out.push(op::NEWFALSE),
        Value::Int(n) => write_int(out, *n),
        Value::Float(f) => {
            out.push(op::BINFLOAT);
            out.extend_from_slice(&f.to_be_bytes());
        }
        Value::Str(s) => write_str(out, s),
        Value::Bytes(b) => write_bytes(out, b),
        Value::List(items) => {
            out.push(op::EMPTY_LIST);
            if !items.is_empty() {
                out.push(op::MARK);
                for item in items {
                    write_value(out, item);
                }
                out.push(op::APPENDS);
            }
        }
        Value::Tuple(items) => match items.as_slice() {
            [] => out.push(op::EMPTY_TUPLE),
            [a] => {
                write_value(out, a);
                out.push(op::TUPLE1);
            }
            [a, b] => {
                write_value(out, a);
                write_value(out, b);
                out.push(op::TUPLE2);
            }
            [a, b, c] => {
                write_value(out, a);
                write_value(out, b);
                write_value(out, c);
                out.push(op::TUPLE3);
            }
            _ => {
                out.push(op::MARK);
                for item in items {
                    write_value(out, item);
                }
                out.push(op::TUPLE);
            }
        },
        Value::Dict(items) => {
            out.push(op::EMPTY_DICT);
            if !items.is_empty() {
                out.push(op::MARK);
                for (key, value) in items {
                    write_value(out, key);
                    write_value(out, value);
                }
                out.push(op::SETITEMS);
            }
        }
        Value::Exception(message) => {
            // `exceptions.Exception`: Python 2's name, which Python 3 maps to
            // `builtins.Exception` for protocols < 3.
            out.push(op::GLOBAL);
            out.extend_from_slice(b"exceptions\nException\n");
            write_str(out, message);
            out.push(op::TUPLE1);
            out.push(op::REDUCE);
        }
    }
}

fn write_int(out: &mut Vec<u8>, n: i64) {
    if let Ok(b) = u8::try_from(n) {
        out.push(op::BININT1);
        out.push(b);
    } else if let Ok(w) = u16::try_from(n) {
        out.push(op::BININT2);
        out.extend_from_slice(&w.to_le_bytes());
    } else if let Ok(d) = i32::try_from(n) {
        out.push(op::BININT);
        out.extend_from_slice(&d.to_le_bytes());
    } else {
        // Shortest little-endian two's complement, as Python's encode_long.
        let mut bytes = n.to_le_bytes().to_vec();
        while let [.., prev, last] = bytes.as_slice() {
            let redundant =
                (*last == 0x00 && prev & 0x80 == 0) || (*last == 0xff && prev & 0x80 != 0);
            if !redundant {
                break;
            }
            bytes.pop();
        }
        out.push(op::LONG1);
        out.push(bytes.len() as u8); // at most 8
        out.extend_from_slice(&bytes);
    }
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    match u32::try_from(s.len()) {
        Ok(len) => {
            out.push(op::BINUNICODE);
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        Err(_) => write_str_text(out, s),
    }
}

/// Protocol-0 UNICODE form (raw-unicode-escape), for strings too long for
/// BINUNICODE's 32-bit length.
fn write_str_text(out: &mut Vec<u8>, s: &str) {
    out.push(op::UNICODE);
    for ch in s.chars() {
        let code = u32::from(ch);
        match ch {
            '\\' | '\0' | '\n' | '\r' | '\u{1a}' => {
                out.extend_from_slice(format!("\\u{code:04x}").as_bytes());
            }
            _ if code < 0x100 => out.push(code as u8),
            _ if code <= 0xffff => out.extend_from_slice(format!("\\u{code:04x}").as_bytes()),
            _ => out.extend_from_slice(format!("\\U{code:08x}").as_bytes()),
        }
    }
    out.push(b'\n');
}

fn write_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    if let Ok(len) = u8::try_from(bytes.len()) {
        out.push(op::SHORT_BINSTRING);
        out.push(len);
        out.extend_from_slice(bytes);
    } else if let Ok(len) = i32::try_from(bytes.len()) {
        out.push(op::BINSTRING);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(bytes);
    } else {
        write_bytes_text(out, bytes);
    }
}

/// Protocol-0 STRING form (quoted, backslash-escaped), for byte strings too
/// long for BINSTRING's signed 32-bit length.
fn write_bytes_text(out: &mut Vec<u8>, bytes: &[u8]) {
    out.push(op::STRING);
    out.push(b'\'');
    for &b in bytes {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\'' => out.extend_from_slice(b"\\'"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0x20..=0x7e => out.push(b),
            _ => out.extend_from_slice(format!("\\x{b:02x}").as_bytes()),
        }
    }
    out.extend_from_slice(b"'\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 1 << 20;

    fn h(hex: &str) -> Vec<u8> {
        assert_eq!(hex.len() % 2, 0);
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect()
    }

    fn s(text: &str) -> Value {
        Value::Str(text.to_owned())
    }

    fn one(bytes: &[u8]) -> Value {
        match decode(bytes, MAX) {
            Ok(Some((value, used))) => {
                assert_eq!(used, bytes.len(), "consumed for {bytes:02x?}");
                value
            }
            other => panic!("decode {bytes:02x?}: {other:?}"),
        }
    }

    fn err(bytes: &[u8]) -> PickleError {
        match decode(bytes, MAX) {
            Err(e) => e,
            other => panic!("expected an error for {bytes:02x?}, got {other:?}"),
        }
    }

    fn assert_forbidden(bytes: &[u8], opcode: u8, needle: &str) {
        let e = err(bytes);
        assert!(
            matches!(&e, PickleError::Forbidden { opcode: o, .. } if *o == opcode),
            "{e:?}"
        );
        let msg = e.to_string();
        assert!(msg.contains(needle), "{msg:?} lacks {needle:?}");
        assert!(msg.contains("refused"), "{msg}");
        assert!(!msg.contains('\n'), "{msg:?}");
    }

    fn vm_list() -> Value {
        Value::List(vec![
            Value::Dict(vec![
                (s("name"), s("vm1")),
                (s("uuid"), s("0123456789abcdef-fedcba9800000000")),
                (s("port"), Value::Int(50000)),
            ]),
            Value::Dict(vec![
                (s("name"), s("b")),
                (s("uuid"), s("u")),
                (s("port"), Value::None),
            ]),
        ])
    }

    /// Byte vectors produced by CPython 3.11 `pickle.dumps(value, protocol)`,
    /// plus hand-written Python 2 cPickle-style ones checked with
    /// `pickle.loads`.
    fn vectors() -> Vec<(Vec<u8>, Value)> {
        let x300 = "x".repeat(300);
        let x300_hex = "78".repeat(300);
        let tuple = Value::Tuple(vec![Value::Int(1), s("a"), Value::None, Value::Float(2.5)]);
        let exc = Value::Exception("No common version".into());
        let mut v = vec![
            // 3
            (h("49330a2e"), Value::Int(3)),
            (h("80024b032e"), Value::Int(3)),
            (h("80044b032e"), Value::Int(3)),
            // None
            (h("4e2e"), Value::None),
            (h("80024e2e"), Value::None),
            (h("80044e2e"), Value::None),
            // 'vm_found'
            (h("56766d5f666f756e640a70300a2e"), s("vm_found")),
            (h("80025808000000766d5f666f756e6471002e"), s("vm_found")),
            (
                h("8004950c000000000000008c08766d5f666f756e64942e"),
                s("vm_found"),
            ),
            // 'free_for_all'
            (h("56667265655f666f725f616c6c0a70300a2e"), s("free_for_all")),
            (
                h("8002580c000000667265655f666f725f616c6c71002e"),
                s("free_for_all"),
            ),
            (
                h("80049510000000000000008c0c667265655f666f725f616c6c942e"),
                s("free_for_all"),
            ),
            // 'x' * 300
            (h(&format!("56{x300_hex}0a70300a2e")), s(&x300)),
            (h(&format!("8002582c010000{x300_hex}71002e")), s(&x300)),
            (
                h(&format!("8004953301000000000000582c010000{x300_hex}942e")),
                s(&x300),
            ),
            // the VM list
            (
                h("286c70300a286470310a566e616d650a70320a56766d310a70330a7356757569640a70340a56303132333435363738396162636465662d666564636261393830303030303030300a70350a7356706f72740a70360a4935303030300a7361286470370a67320a56620a70380a7367340a56750a70390a7367360a4e73612e"),
                vm_list(),
            ),
            (
                h("80025d7100287d71012858040000006e616d6571025803000000766d31710358040000007575696471045821000000303132333435363738396162636465662d6665646362613938303030303030303071055804000000706f727471064d50c3757d710728680258010000006271086804580100000075710968064e75652e"),
                vm_list(),
            ),
            (
                h("8004955e000000000000005d94287d94288c046e616d65948c03766d31948c0475756964948c21303132333435363738396162636465662d66656463626139383030303030303030948c04706f7274944d50c3757d942868028c01629468048c01759468064e75652e"),
                vm_list(),
            ),
            // Exception('No common version')
            (
                h("63657863657074696f6e730a457863657074696f6e0a70300a28564e6f20636f6d6d6f6e2076657273696f6e0a70310a7470320a5270330a2e"),
                exc.clone(),
            ),
            (
                h("800263657863657074696f6e730a457863657074696f6e0a710058110000004e6f20636f6d6d6f6e2076657273696f6e71018571025271032e"),
                exc.clone(),
            ),
            (
                h("80049532000000000000008c086275696c74696e73948c09457863657074696f6e9493948c114e6f20636f6d6d6f6e2076657273696f6e94859452942e"),
                exc.clone(),
            ),
            // True / False
            (h("4930310a2e"), Value::Bool(true)),
            (h("8002882e"), Value::Bool(true)),
            (h("8004882e"), Value::Bool(true)),
            (h("4930300a2e"), Value::Bool(false)),
            (h("8002892e"), Value::Bool(false)),
            (h("8004892e"), Value::Bool(false)),
            // -5
            (h("492d350a2e"), Value::Int(-5)),
            (h("80024afbffffff2e"), Value::Int(-5)),
            (h("80049506000000000000004afbffffff2e"), Value::Int(-5)),
            // 2**40, -2**40, 2**63-1, -2**63
            (h("4c313039393531313632373737364c0a2e"), Value::Int(1 << 40)),
            (h("80028a060000000000012e"), Value::Int(1 << 40)),
            (h("80049509000000000000008a060000000000012e"), Value::Int(1 << 40)),
            (h("80028a060000000000ff2e"), Value::Int(-(1 << 40))),
            (
                h("4c393232333337323033363835343737353830374c0a2e"),
                Value::Int(i64::MAX),
            ),
            (h("80028a08ffffffffffffff7f2e"), Value::Int(i64::MAX)),
            (h("80028a0800000000000000802e"), Value::Int(i64::MIN)),
            // b'\xff\x00' (protocol 4; protocols 0/2 use _codecs.encode)
            (
                h("80049506000000000000004302ff00942e"),
                Value::Bytes(vec![0xff, 0]),
            ),
            (
                h(&format!("8004953301000000000000422c010000{}942e", "01".repeat(300))),
                Value::Bytes(vec![1; 300]),
            ),
            // bytearray(b'ab'), protocol 5
            (
                h("8005950d000000000000009602000000000000006162942e"),
                Value::Bytes(b"ab".to_vec()),
            ),
            // (1, 'a', None, 2.5)
            (h("2849310a56610a70300a4e46322e350a7470310a2e"), tuple.clone()),
            (h("8002284b0158010000006171004e4740040000000000007471012e"), tuple.clone()),
            (
                h("8004951400000000000000284b018c0161944e47400400000000000074942e"),
                tuple.clone(),
            ),
            (
                h("8002284b014b024b034b047471002e"),
                Value::Tuple((1..=4).map(Value::Int).collect()),
            ),
            // -1.5e300
            (h("462d312e35652b3330300a2e"), Value::Float(-1.5e300)),
            (h("800247fe41eb2d660058352e"), Value::Float(-1.5e300)),
            // 'h\xe9llo \u20ac\U0001F600 a\\b\nc'
            (
                h("5668e96c6c6f205c75323061635c55303030316636303020615c7530303563625c7530303061630a70300a2e"),
                s("h\u{e9}llo \u{20ac}\u{1F600} a\\b\nc"),
            ),
            (
                h("8002581400000068c3a96c6c6f20e282acf09f988020615c620a6371002e"),
                s("h\u{e9}llo \u{20ac}\u{1F600} a\\b\nc"),
            ),
            (
                h("80049518000000000000008c1468c3a96c6c6f20e282acf09f988020615c620a63942e"),
                s("h\u{e9}llo \u{20ac}\u{1F600} a\\b\nc"),
            ),
            // ([], (), {}, '')
            (
                h("28286c70300a2874286470310a560a70320a7470330a2e"),
                Value::Tuple(vec![
                    Value::List(vec![]),
                    Value::Tuple(vec![]),
                    Value::Dict(vec![]),
                    s(""),
                ]),
            ),
            (
                h("8004950c00000000000000285d94297d948c009474942e"),
                Value::Tuple(vec![
                    Value::List(vec![]),
                    Value::Tuple(vec![]),
                    Value::Dict(vec![]),
                    s(""),
                ]),
            ),
            // x = [1]; [x, x]: the memo refers to the list, filled after PUT
            (
                h("286c70300a286c70310a49310a616167310a612e"),
                Value::List(vec![
                    Value::List(vec![Value::Int(1)]),
                    Value::List(vec![Value::Int(1)]),
                ]),
            ),
            (
                h("80025d7100285d71014b01616801652e"),
                Value::List(vec![
                    Value::List(vec![Value::Int(1)]),
                    Value::List(vec![Value::Int(1)]),
                ]),
            ),
            // {1: 'a', (2, 3): [True, None]}
            (
                h("80027d7100284b0158010000006171014b024b038671025d710328884e65752e"),
                Value::Dict(vec![
                    (Value::Int(1), s("a")),
                    (
                        Value::Tuple(vec![Value::Int(2), Value::Int(3)]),
                        Value::List(vec![Value::Bool(true), Value::None]),
                    ),
                ]),
            ),
        ];
        // Python 2 cPickle style.
        let py2: Vec<(&[u8], Value)> = vec![
            (
                b"(dp0\nS'name'\np1\nS'vm1'\np2\nsS'port'\np3\nI50000\nsS'ok'\np4\nI01\ns.",
                Value::Dict(vec![
                    (s("name"), s("vm1")),
                    (s("port"), Value::Int(50000)),
                    (s("ok"), Value::Bool(true)),
                ]),
            ),
            (
                b"(lp0\n(dp1\nS'name'\np2\nS'vm1'\np3\nsa(dp4\ng2\nS'b'\np5\nsa.",
                Value::List(vec![
                    Value::Dict(vec![(s("name"), s("vm1"))]),
                    Value::Dict(vec![(s("name"), s("b"))]),
                ]),
            ),
            (
                b"cexceptions\nException\np0\n(S'No common version'\np1\ntp2\nRp3\n.",
                exc.clone(),
            ),
            (
                b"\x80\x02cexceptions\nException\nq\x00U\x11No common versionq\x01\x85q\x02Rq\x03.",
                exc.clone(),
            ),
            (
                b"c__builtin__\nException\n)R.",
                Value::Exception(String::new()),
            ),
            (
                b"S'a\\'b\\x41\\n\\101\\\\z\\q'\np0\n.",
                s("a'bA\nA\\z\\q"),
            ),
            (b"S\"it's\"\n.", s("it's")),
            (b"S'\\xff\\x00'\n.", Value::Bytes(vec![0xff, 0])),
            (b"U\x02\xff\x00.", Value::Bytes(vec![0xff, 0])),
            (b"L-1099511627776L\n.", Value::Int(-(1 << 40))),
            (b"L5\n.", Value::Int(5)),
            (b"I1099511627776\n.", Value::Int(1 << 40)),
            (b"(I1\nS'a'\nNF2.5\ntp0\n.", tuple),
            (
                b"Vh\xe9llo \\u20ac\\ud83d\\ude00\n.",
                s("h\u{e9}llo \u{20ac}\u{1F600}"),
            ),
            (b"T\x03\x00\x00\x00abc.", s("abc")),
            (b"\x80\x03C\x02hiB\x01\x00\x00\x00!\x86.", Value::Tuple(vec![
                Value::Bytes(b"hi".to_vec()),
                Value::Bytes(b"!".to_vec()),
            ])),
            // POP, POP_MARK, DUP, LIST, TUPLE, DICT, SETITEM, APPEND
            (b"N0(K\x011K\x022\x86.", Value::Tuple(vec![Value::Int(2), Value::Int(2)])),
            (b"(0N.", Value::None),
            (b"(K\x01K\x02l(K\x03t(U\x01kK\x04d\x87.", Value::Tuple(vec![
                Value::List(vec![Value::Int(1), Value::Int(2)]),
                Value::Tuple(vec![Value::Int(3)]),
                Value::Dict(vec![(s("k"), Value::Int(4))]),
            ])),
            (b"]K\x07a}K\x01K\x02s\x86.", Value::Tuple(vec![
                Value::List(vec![Value::Int(7)]),
                Value::Dict(vec![(Value::Int(1), Value::Int(2))]),
            ])),
            (b"Nr\x05\x00\x00\x000j\x05\x00\x00\x00.", Value::None),
            (b"\x80\x04\x8d\x01\x00\x00\x00\x00\x00\x00\x00z\x8e\x00\x00\x00\x00\x00\x00\x00\x00\x86.",
                Value::Tuple(vec![s("z"), Value::Bytes(vec![])])),
            (b"\x80\x02\x8b\x02\x00\x00\x00\xff\x7f.", Value::Int(0x7fff)),
            (b"\x80\x02\x8a\x00.", Value::Int(0)),
            (b"\x80\x02\x8a\x09\xff\xff\xff\xff\xff\xff\xff\xff\xff.", Value::Int(-1)),
        ];
        v.extend(py2.into_iter().map(|(b, val)| (b.to_vec(), val)));
        v
    }

    #[test]
    fn python_vectors_decode() {
        for (bytes, expected) in vectors() {
            assert_eq!(one(&bytes), expected, "vector {bytes:02x?}");
        }
    }

    #[test]
    fn every_strict_prefix_needs_more() {
        for (bytes, _) in vectors() {
            for len in 0..bytes.len() {
                assert_eq!(
                    decode(&bytes[..len], MAX),
                    Ok(None),
                    "prefix {len} of {bytes:02x?}"
                );
            }
        }
    }

    #[test]
    fn exact_max_len_is_enough() {
        for (bytes, expected) in vectors() {
            assert_eq!(
                decode(&bytes, bytes.len()),
                Ok(Some((expected, bytes.len())))
            );
            assert_eq!(
                decode(&bytes, bytes.len() - 1),
                Err(PickleError::TooLarge {
                    limit: bytes.len() - 1
                })
            );
        }
    }

    #[test]
    fn back_to_back_pickles() {
        let all = vectors();
        let mut stream = Vec::new();
        for (bytes, _) in &all {
            stream.extend_from_slice(bytes);
        }
        let mut rest = stream.as_slice();
        for (bytes, expected) in &all {
            let (value, used) = decode(rest, MAX).unwrap().unwrap();
            assert_eq!(&value, expected);
            assert_eq!(used, bytes.len());
            rest = &rest[used..];
        }
        assert!(rest.is_empty());
        assert_eq!(decode(rest, MAX), Ok(None));

        // The spec's example: 3 then 'vm_found' in one buffer.
        let two = h("80044b032e8004950c000000000000008c08766d5f666f756e64942e");
        assert_eq!(decode(&two, MAX), Ok(Some((Value::Int(3), 5))));
        assert_eq!(decode(&two[5..], MAX), Ok(Some((s("vm_found"), 23))));
    }

    #[test]
    fn incremental_decoder_matches_decode() {
        let all = vectors();
        let mut stream = Vec::new();
        for (bytes, _) in &all {
            stream.extend_from_slice(bytes);
        }
        let mut dec = Decoder::new(MAX);
        let mut buf: Vec<u8> = Vec::new();
        let mut got = Vec::new();
        for &b in &stream {
            buf.push(b);
            while let Some((value, used)) = dec.decode(&buf).unwrap() {
                got.push(value);
                buf.drain(..used);
            }
        }
        assert!(buf.is_empty());
        let expected: Vec<Value> = all.into_iter().map(|(_, v)| v).collect();
        assert_eq!(got, expected);

        let mut dec = Decoder::new(4);
        assert_eq!(dec.decode(b"(NN"), Ok(None));
        assert_eq!(dec.decode(b"(NNN"), Err(PickleError::TooLarge { limit: 4 }));
        assert_eq!(dec.decode(b"N."), Ok(Some((Value::None, 2))));
    }

    fn samples() -> Vec<Value> {
        let mut nested = Value::Int(0);
        for i in 0..(MAX_DEPTH - 1) {
            nested = if i % 2 == 0 {
                Value::List(vec![nested])
            } else {
                Value::Tuple(vec![nested, Value::None])
            };
        }
        vec![
            Value::None,
            Value::Bool(true),
            Value::Bool(false),
            Value::Int(0),
            Value::Int(255),
            Value::Int(256),
            Value::Int(65535),
            Value::Int(65536),
            Value::Int(-1),
            Value::Int(i32::MAX.into()),
            Value::Int(i32::MIN.into()),
            Value::Int(i64::from(i32::MAX) + 1),
            Value::Int(i64::from(i32::MIN) - 1),
            Value::Int(1 << 40),
            Value::Int(-(1 << 40)),
            Value::Int(0x80 << 32),
            Value::Int(-(0x80 << 32)),
            Value::Int(i64::MAX),
            Value::Int(i64::MIN),
            Value::Float(0.0),
            Value::Float(-2.5),
            Value::Float(f64::INFINITY),
            Value::Float(1e-300),
            s(""),
            s("vm_found"),
            s(&"y".repeat(70_000)),
            s("h\u{e9}llo \u{20ac}\u{1F600} a\\b\nc\r\0\u{1a}'\""),
            Value::Bytes(vec![]),
            Value::Bytes(vec![0xff, 0x00]),
            Value::Bytes(vec![0x80; 255]),
            Value::Bytes(vec![0x81; 256]),
            Value::Bytes(b"plain ascii".to_vec()),
            Value::List(vec![]),
            Value::Tuple(vec![]),
            Value::Dict(vec![]),
            Value::Tuple(vec![Value::Int(1)]),
            Value::Tuple(vec![Value::Int(1), s("a")]),
            Value::Tuple(vec![Value::Int(1), s("a"), Value::None]),
            Value::Tuple((0..10).map(Value::Int).collect()),
            Value::List((0..2000).map(Value::Int).collect()),
            vm_list(),
            Value::Dict(vec![
                (Value::Int(1), s("one")),
                (Value::None, Value::List(vec![Value::Bool(false)])),
                (Value::Tuple(vec![s("k")]), Value::Dict(vec![])),
            ]),
            Value::Exception("No common version".into()),
            Value::Exception(String::new()),
            Value::List(vec![
                Value::Exception("x".into()),
                Value::Exception("y".into()),
            ]),
            nested,
        ]
    }

    #[test]
    fn encode_decode_round_trip() {
        for value in samples() {
            let bytes = encode(&value);
            assert_eq!(bytes.get(..2), Some(&[0x80, 0x02][..]));
            assert_eq!(bytes.last(), Some(&b'.'));
            assert_eq!(one(&bytes), value.read_back());
        }
        assert_eq!(one(&encode(&Value::Bytes(b"ab".to_vec()))), s("ab"));
    }

    #[test]
    fn encoder_layout() {
        assert_eq!(encode(&Value::Int(3)), h("80024b032e"));
        assert_eq!(encode(&Value::None), h("80024e2e"));
        assert_eq!(encode(&Value::Int(-5)), h("80024afbffffff2e"));
        assert_eq!(encode(&Value::Int(1 << 40)), h("80028a060000000000012e"));
        assert_eq!(encode(&Value::Int(-(1 << 40))), h("80028a060000000000ff2e"));
        assert_eq!(
            encode(&Value::Int(i64::MAX)),
            h("80028a08ffffffffffffff7f2e")
        );
        assert_eq!(
            encode(&s("vm_found")),
            h("80025808000000766d5f666f756e642e")
        );
        assert_eq!(
            encode(&Value::Bytes(vec![0xff, 0])),
            b"\x80\x02U\x02\xff\x00."
        );
        assert_eq!(encode(&Value::List(vec![])), b"\x80\x02].");
        assert_eq!(encode(&Value::List(vec![Value::None])), b"\x80\x02](Ne.");
        assert_eq!(
            encode(&Value::Dict(vec![(Value::None, Value::None)])),
            b"\x80\x02}(NNu."
        );
        assert_eq!(
            encode(&Value::Exception("m".into())),
            b"\x80\x02cexceptions\nException\nX\x01\x00\x00\x00m\x85R."
        );
    }

    #[test]
    fn text_fallback_forms_round_trip() {
        let text = "h\u{e9}llo \u{20ac}\u{1F600} a\\b\nc\r\0\u{1a}\u{ff}";
        let mut out = Vec::new();
        write_str_text(&mut out, text);
        out.push(b'.');
        assert_eq!(one(&out), s(text));

        let bytes: Vec<u8> = (0..=255).collect();
        let mut out = Vec::new();
        write_bytes_text(&mut out, &bytes);
        out.push(b'.');
        assert_eq!(one(&out), Value::Bytes(bytes));
    }

    #[test]
    fn code_execution_is_refused() {
        assert_forbidden(
            b"cos\nsystem\n(S'echo hi'\ntR.",
            op::GLOBAL,
            "GLOBAL os.system",
        );
        assert_forbidden(
            b"\x80\x02cposix\nsystem\nq\x00X\x07\x00\x00\x00echo hi\x85R.",
            op::GLOBAL,
            "GLOBAL posix.system",
        );
        assert_forbidden(
            b"\x80\x02cbuiltins\neval\nX\x01\x00\x00\x001\x85R.",
            op::GLOBAL,
            "GLOBAL builtins.eval",
        );
        assert_forbidden(
            b"\x80\x04\x95\x1a\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94\x8c\x06system\x94\x93\x94\x8c\x07echo hi\x85R.",
            op::STACK_GLOBAL,
            "STACK_GLOBAL os.system",
        );
        assert_forbidden(b"\x80\x04K\x01K\x02\x93.", op::STACK_GLOBAL, "non-str");
        // Exception lookalikes.
        assert_forbidden(
            b"cbuiltins\nExceptionGroup\n)R.",
            op::GLOBAL,
            "builtins.ExceptionGroup",
        );
        assert_forbidden(b"cos\nException\n)R.", op::GLOBAL, "os.Exception");
        // Python 3's pickling of bytes for protocols < 3.
        assert_forbidden(
            &h("8002635f636f646563730a656e636f64650a71005803000000c3bf00710158060000006c6174696e3171028671035271042e"),
            op::GLOBAL,
            "_codecs.encode",
        );
        assert_forbidden(b"(S'ls'\nios\nsystem\n.", op::INST, "INST os.system");
        assert_forbidden(
            b"\x80\x02cexceptions\nException\n)\x81.",
            op::NEWOBJ,
            "NEWOBJ",
        );
        assert_forbidden(b"\x80\x02}}b.", op::BUILD, "BUILD");
        assert_forbidden(b"cexceptions\nException\n)R}b.", op::BUILD, "BUILD");
        assert_forbidden(b"Pabc\n.", op::PERSID, "PERSID");
        assert_forbidden(b"NQ.", op::BINPERSID, "BINPERSID");
        assert_forbidden(b"(o.", op::OBJ, "OBJ");
        assert_forbidden(b"\x80\x02\x82\x01.", op::EXT1, "EXT1");
        assert_forbidden(b"\x80\x02\x83\x01\x00.", op::EXT2, "EXT2");
        assert_forbidden(b"\x80\x02\x84\x01\x00\x00\x00.", op::EXT4, "EXT4");
        assert_forbidden(b"\x80\x04)}\x92.", op::NEWOBJ_EX, "NEWOBJ_EX");
        // REDUCE only ever calls Exception, and only with () or (str,).
        assert_forbidden(b"N)R.", op::REDUCE, "REDUCE");
        assert_forbidden(b"cexceptions\nException\nK\x01\x85R.", op::REDUCE, "REDUCE");
        assert_forbidden(
            b"cexceptions\nException\nU\x01aU\x01b\x86R.",
            op::REDUCE,
            "REDUCE",
        );
        assert_forbidden(b"cexceptions\nException\nNR.", op::REDUCE, "REDUCE");
        // The class itself is not a value.
        assert_forbidden(b"cexceptions\nException\n.", op::GLOBAL, "Exception");
        // Hostile names are shown on one printable line.
        let e = err(b"c\x1b[31mos\nsys\xfftem\n.").to_string();
        assert!(e.contains("\\x1b[31mos.sys\\xfftem"), "{e}");
    }

    #[test]
    fn refusals_name_the_opcode() {
        assert_eq!(
            err(b"cos\nsystem\n(S'echo hi'\ntR.").to_string(),
            "pickle opcode 0x63 (GLOBAL os.system) is refused: only plain values are accepted"
        );
    }

    #[test]
    fn unsupported_features() {
        let set = h("80049507000000000000008f94284b01902e");
        assert!(matches!(err(&set), PickleError::Unsupported(_)));
        assert!(matches!(err(b"\x80\x05\x97."), PickleError::Unsupported(_)));
        // l = []; l.append(l)
        let e = err(&h("80025d71006800612e"));
        assert!(matches!(e, PickleError::Unsupported(_)), "{e:?}");
        assert!(matches!(err(b"]2a."), PickleError::Unsupported(_)));
    }

    #[test]
    fn garbage_is_malformed() {
        for bad in [
            &b"\xff\xff\xff"[..],
            b"\x80\x06N.",
            b"a.",
            b"NN.",
            b"(N.",
            b".",
            b"t.",
            b"1.",
            b"Ns.",
            b"NNa.",
            b"NNNs.",
            b"}(N.",
            b"(Nd.",
            b"h\x00.",
            b"g7\n.",
            b"Ip\n.",
            b"I99999999999999999999\n.",
            b"L18446744073709551616L\n.",
            b"Fx\n.",
            b"Sabc\n.",
            b"S'a\n.",
            b"S'\\x4'\n.",
            b"S'\\'\n.",
            b"V\\u12\n.",
            b"V\\ud800\n.",
            b"V\\U00110000\n.",
            b"X\x01\x00\x00\x00\xff.",
            b"\x8c\x02\xc3(.",
            b"T\xff\xff\xff\xff.",
            b"\x8b\xff\xff\xff\xff.",
            b"\x8b\x11\x00\x00\x00.",
            b"\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x00\x01.",
            b"\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x80\x00.",
            b"pN\n.",
            b"N(q\x00.",
            b"](K\x01a.",
        ] {
            let e = err(bad);
            assert!(matches!(e, PickleError::Malformed(_)), "{bad:02x?}: {e:?}");
            assert!(!e.to_string().contains('\n'), "{e}");
        }
        // The real 2**64 from Python.
        assert!(matches!(
            err(&h("80028a090000000000000000012e")),
            PickleError::Malformed(_)
        ));
        assert!(matches!(
            err(&h("4c31383434363734343037333730393535313631364c0a2e")),
            PickleError::Malformed(_)
        ));
    }

    #[test]
    fn over_long_stream_is_too_large() {
        let mut stream = b"\x80\x02(".to_vec();
        stream.extend_from_slice(&vec![b'N'; 10_000]);
        assert_eq!(
            decode(&stream, 100),
            Err(PickleError::TooLarge { limit: 100 })
        );
        assert_eq!(
            decode(&stream[..100], 100),
            Err(PickleError::TooLarge { limit: 100 })
        );
        assert_eq!(decode(&stream[..99], 100), Ok(None));
        // A text opcode whose newline never comes.
        let mut line = b"I".to_vec();
        line.extend_from_slice(&[b'1'; 200]);
        assert_eq!(decode(&line, 64), Err(PickleError::TooLarge { limit: 64 }));
        // A length prefix pointing past max_len fails at once.
        assert_eq!(
            decode(b"X\x00\x10\x00\x00", 1000),
            Err(PickleError::TooLarge { limit: 1000 })
        );
        assert_eq!(decode(b"", 0), Err(PickleError::TooLarge { limit: 0 }));
    }

    #[test]
    fn huge_length_prefixes_do_not_allocate() {
        let huge8 = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f];
        for opcode in [op::BINUNICODE8, op::BINBYTES8, op::BYTEARRAY8] {
            let mut b = vec![0x80, 0x04, opcode];
            b.extend_from_slice(&huge8);
            b.extend_from_slice(b"abc");
            assert_eq!(decode(&b, MAX), Err(PickleError::TooLarge { limit: MAX }));
            // Even with no byte limit nothing is allocated up front.
            assert_eq!(decode(&b, usize::MAX), Ok(None));
            let mut all = b;
            all[3..11].copy_from_slice(&[0xff; 8]);
            assert!(matches!(decode(&all, usize::MAX), Ok(None) | Err(_)));
        }
        for opcode in [op::BINUNICODE, op::BINBYTES, op::BINSTRING] {
            let b = [opcode, 0xfe, 0xff, 0xff, 0x7f, b'a'];
            assert_eq!(decode(&b, MAX), Err(PickleError::TooLarge { limit: MAX }));
            assert_eq!(decode(&b, usize::MAX), Ok(None));
        }
        assert!(matches!(
            decode(b"\x80\x02\x8b\xff\xff\xff\x7f\x00", usize::MAX),
            Err(PickleError::Malformed(_))
        ));
    }

    #[test]
    fn deep_nesting_fails_cleanly() {
        let marks = vec![b'('; 100_000];
        assert!(matches!(
            decode(&marks, MAX),
            Err(PickleError::TooComplex(_))
        ));

        let mut lists = b"]".to_vec();
        for _ in 0..100_000 {
            lists.extend_from_slice(b"(]");
        }
        assert!(matches!(
            decode(&lists, MAX),
            Err(PickleError::TooComplex(_))
        ));

        // Nesting without MARKs: 50k lists appended into each other.
        let mut appends = vec![b']'; 50_000];
        appends.extend_from_slice(&vec![b'a'; 49_999]);
        appends.push(b'.');
        assert!(matches!(
            decode(&appends, MAX),
            Err(PickleError::TooComplex(_))
        ));

        let mut tuples = b"N".to_vec();
        tuples.extend_from_slice(&vec![op::TUPLE1; 10_000]);
        tuples.push(b'.');
        assert!(matches!(
            decode(&tuples, MAX),
            Err(PickleError::TooComplex(_))
        ));

        // Exactly MAX_DEPTH levels is fine, one more is not.
        let mut ok = b"N".to_vec();
        ok.extend_from_slice(&[op::TUPLE1; MAX_DEPTH]);
        ok.push(b'.');
        assert_ne!(one(&ok), Value::None);
        let mut deep = b"N".to_vec();
        deep.extend_from_slice(&[op::TUPLE1; MAX_DEPTH + 1]);
        deep.push(b'.');
        assert!(matches!(
            decode(&deep, MAX),
            Err(PickleError::TooComplex(_))
        ));
    }

    #[test]
    fn sharing_cannot_multiply_size() {
        // t = (); t = (t, t) forty times: 2**40 elements if expanded.
        let mut b = b"\x80\x02)".to_vec();
        for _ in 0..40 {
            b.extend_from_slice(b"q\x00h\x00\x86");
        }
        b.push(b'.');
        assert!(matches!(decode(&b, MAX), Err(PickleError::TooComplex(_))));

        // One 60 kB string fetched from the memo 100 times.
        let mut b = b"\x80\x02](X\x60\xea\x00\x00".to_vec();
        b.extend_from_slice(&vec![b'z'; 60_000]);
        b.extend_from_slice(b"q\x00");
        for _ in 0..100 {
            b.extend_from_slice(b"h\x00");
        }
        b.extend_from_slice(b"e.");
        assert!(matches!(
            decode(&b, 70_000),
            Err(PickleError::TooComplex(_))
        ));

        // Too many values pushed.
        let mut b = b"]".to_vec();
        for _ in 0..MAX_ELEMENTS {
            b.extend_from_slice(b"Na");
        }
        b.push(b'.');
        assert!(matches!(decode(&b, MAX), Err(PickleError::TooComplex(_))));

        // Too many memo entries.
        let mut b = b"N".to_vec();
        for i in 0..=(MAX_MEMO as u32) {
            b.push(op::LONG_BINPUT);
            b.extend_from_slice(&i.to_le_bytes());
        }
        b.push(b'.');
        assert!(matches!(
            decode(&b, MAX * 8),
            Err(PickleError::TooComplex(_))
        ));
    }
}

#[cfg(test)]
mod stream_tests {
    use super::*;

    #[test]
    fn values_come_out_one_by_one_whatever_the_pieces() {
        let mut wire = encode(&Value::Int(3));
        wire.extend(encode(&Value::Str("vm_found".into())));
        wire.extend_from_slice(b"rest");
        for piece in [1, 2, 7, wire.len()] {
            let mut s = Stream::new(1 << 10);
            let mut got = Vec::new();
            for chunk in wire.chunks(piece) {
                s.feed(chunk);
                while let Some(v) = s.next_value().unwrap() {
                    got.push(v);
                }
                if got.len() == 2 {
                    break;
                }
            }
            assert_eq!(got, vec![Value::Int(3), Value::Str("vm_found".into())]);
        }
        let mut s = Stream::new(1 << 10);
        s.feed(&wire);
        s.next_value().unwrap();
        s.next_value().unwrap();
        assert_eq!(s.take_rest(), b"rest");
    }
}
