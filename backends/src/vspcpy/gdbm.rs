//! A read-only reader of GNU dbm files (Python's `dbm.gnu`), enough to list
//! every key and value of a file another program wrote and closed.
//!
//! The layout, as libgdbm writes it on a little-endian machine (offsets are
//! `off_t`: 8 bytes for the `...cf`/`...d1` magics, 4 for the 32-bit ones):
//!
//! - header at 0: magic, block size, the bucket directory's offset and byte
//!   size, its bit count, the bucket size and how many elements a bucket
//!   holds (then the free-space table, which a reader does not need; the
//!   "numsync" magics add a small extension header there too);
//! - the directory: `2^dir_bits` offsets of buckets (several entries may
//!   name the same bucket);
//! - a bucket: a free-space table of 6 entries, `bucket_bits`, `count`,
//!   then `bucket_elems` elements of (hash, first 4 key bytes, offset of
//!   the key, key size, value size); hash -1 marks an empty element;
//! - the key's bytes at that offset, the value's right after them.
//!
//! Every offset and size read from the file is checked against the file
//! before it is used, sizes are bounded, and nothing is allocated from a
//! size the file states before that size was checked.

use std::collections::BTreeSet;

/// A key and its value, in the file's bytes.
pub type Pair<'a> = (&'a [u8], &'a [u8]);

/// The magics, as libgdbm defines them (native byte order).
const MAGIC_OLD: u32 = 0x1357_9acd;
const MAGIC_32: u32 = 0x1357_9ace;
const MAGIC_64: u32 = 0x1357_9acf;
const MAGIC_NUMSYNC_32: u32 = 0x1357_9ad0;
const MAGIC_NUMSYNC_64: u32 = 0x1357_9ad1;

/// Free-space entries at the start of every bucket.
const BUCKET_AVAIL: usize = 6;

/// Largest key and value this reader takes (vSPC.py's are well under 1 KiB).
pub const MAX_KEY: usize = 64 * 1024;
pub const MAX_VALUE: usize = 1024 * 1024;

/// Most records one file may hold.
pub const MAX_RECORDS: usize = 1_000_000;

/// Whether `head` (the first bytes of a file) starts like a GNU dbm file,
/// in either byte order.
pub fn is_gdbm(head: &[u8]) -> bool {
    let Some(m) = head.get(..4) else {
        return false;
    };
    let m: [u8; 4] = [m[0], m[1], m[2], m[3]];
    [u32::from_le_bytes(m), u32::from_be_bytes(m)]
        .iter()
        .any(|v| (MAGIC_OLD..=MAGIC_NUMSYNC_64).contains(v))
}

/// The sizes that differ between the 32- and 64-bit formats.
#[derive(Debug, Clone, Copy)]
struct Layout {
    /// Bytes of an `off_t`.
    off: usize,
}

impl Layout {
    /// Bytes of one free-space entry in a bucket (`int` size, `off_t`
    /// address, aligned to the `off_t`).
    fn avail_elem(self) -> usize {
        2 * self.off
    }
    /// Where `bucket_bits` is in a bucket.
    fn bucket_bits_at(self) -> usize {
        // av_count, padded to the alignment of the entries after it.
        self.off + BUCKET_AVAIL * self.avail_elem()
    }
    /// Where the first element is in a bucket.
    fn table_at(self) -> usize {
        self.bucket_bits_at() + 8
    }
    /// Bytes of one bucket element.
    fn elem(self) -> usize {
        // hash, key_start[4], data_pointer, key_size, data_size.
        8 + self.off + 8
    }
}

/// Little-endian reads that fail instead of panicking.
struct Bytes<'a>(&'a [u8]);

impl<'a> Bytes<'a> {
    fn u32_at(&self, at: usize) -> Result<u32, String> {
        let b = at
            .checked_add(4)
            .and_then(|end| self.0.get(at..end))
            .ok_or_else(|| format!("is truncated (needs 4 bytes at offset {at})"))?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn i32_at(&self, at: usize) -> Result<i32, String> {
        self.u32_at(at).map(|v| v as i32)
    }
    /// A count or size: an `int` that must not be negative.
    fn size_at(&self, at: usize, what: &str) -> Result<usize, String> {
        let v = self.i32_at(at)?;
        usize::try_from(v).map_err(|_| format!("is corrupt ({what} is negative: {v})"))
    }
    /// An `off_t` of `width` bytes that must not be negative.
    fn offset_at(&self, at: usize, width: usize, what: &str) -> Result<usize, String> {
        let v: i64 = if width == 8 {
            let b = at
                .checked_add(8)
                .and_then(|end| self.0.get(at..end))
                .ok_or_else(|| format!("is truncated (needs 8 bytes at offset {at})"))?;
            i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
        } else {
            i64::from(self.i32_at(at)?)
        };
        usize::try_from(v).map_err(|_| format!("is corrupt ({what} is a negative offset: {v})"))
    }
    /// `len` bytes at `at`, which must lie inside the file.
    fn slice(&self, at: usize, len: usize, what: &str) -> Result<&'a [u8], String> {
        at.checked_add(len)
            .and_then(|end| self.0.get(at..end))
            .ok_or_else(|| {
                format!(
                    "is corrupt ({what} at offset {at}, {len} bytes, lies outside the {}-byte file)",
                    self.0.len()
                )
            })
    }
}

/// Every (key, value) pair of a GNU dbm file's bytes, in bucket order; or
/// what is wrong with the file (phrased to follow the file's name).
pub fn read(data: &[u8]) -> Result<Vec<Pair<'_>>, String> {
    let f = Bytes(data);
    if data.len() < 4 {
        return Err("is truncated (shorter than a GNU dbm header)".into());
    }
    let magic = f.u32_at(0)?;
    let layout =
        match magic {
            MAGIC_64 | MAGIC_NUMSYNC_64 => Layout { off: 8 },
            MAGIC_32 | MAGIC_NUMSYNC_32 | MAGIC_OLD => Layout { off: 4 },
            _ if is_gdbm(data) => return Err(
                "is a GNU dbm file written on a big-endian machine, which this reader does not \
                 read: convert it there (gdbm_dump, then gdbm_load here)"
                    .into(),
            ),
            _ => return Err(format!("is not a GNU dbm file (magic 0x{magic:08x})")),
        };
    // The header's fields after the magic and the block size.
    let w = layout.off;
    // After the magic and the block size; an 8-byte off_t is aligned there too.
    let dir_at = 8;
    let dir = f.offset_at(dir_at, w, "the directory")?;
    let dir_size = f.size_at(dir_at + w, "the directory size")?;
    let dir_bits = f.size_at(dir_at + w + 4, "the directory bit count")?;
    let bucket_size = f.size_at(dir_at + w + 8, "the bucket size")?;
    let bucket_elems = f.size_at(dir_at + w + 12, "the bucket element count")?;

    if dir_bits > 31 {
        return Err(format!(
            "is corrupt (the directory has {dir_bits} bits; at most 31 make sense)"
        ));
    }
    let entries = 1usize << dir_bits;
    if entries.checked_mul(w) != Some(dir_size) {
        return Err(format!(
            "is corrupt (the directory is {dir_size} bytes, but {dir_bits} bits need {entries} \
             entries of {w} bytes)"
        ));
    }
    let dir_bytes = f.slice(dir, dir_size, "the directory")?;
    let table_end = bucket_elems
        .checked_mul(layout.elem())
        .and_then(|n| n.checked_add(layout.table_at()));
    if bucket_elems == 0 || table_end.is_none_or(|end| end > bucket_size) {
        return Err(format!(
            "is corrupt ({bucket_elems} elements do not fit in a {bucket_size}-byte bucket)"
        ));
    }

    let dir = Bytes(dir_bytes);
    let mut buckets = BTreeSet::new();
    for i in 0..entries {
        buckets.insert(dir.offset_at(i * w, w, "a bucket")?);
    }
    let mut out = Vec::new();
    for at in buckets {
        let bucket = Bytes(f.slice(at, bucket_size, "a bucket")?);
        let count = bucket.size_at(layout.bucket_bits_at() + 4, "a bucket's count")?;
        if count > bucket_elems {
            return Err(format!(
                "is corrupt (the bucket at offset {at} says it holds {count} of at most \
                 {bucket_elems} elements)"
            ));
        }
        let mut used = 0;
        for e in 0..bucket_elems {
            let el = layout.table_at() + e * layout.elem();
            if bucket.i32_at(el)? == -1 {
                continue;
            }
            used += 1;
            let key_start = bucket.slice(el + 4, 4, "a key's first bytes")?;
            let ptr = bucket.offset_at(el + 8, w, "a record")?;
            let key_size = bucket.size_at(el + 8 + w, "a key's size")?;
            let data_size = bucket.size_at(el + 12 + w, "a value's size")?;
            if key_size > MAX_KEY {
                return Err(format!(
                    "holds a {key_size}-byte key at offset {ptr}; vSPC.py's keys are uuids"
                ));
            }
            if data_size > MAX_VALUE {
                return Err(format!(
                    "holds a {data_size}-byte value at offset {ptr}, more than the {MAX_VALUE} \
                     bytes a VM's record can need"
                ));
            }
            let key = f.slice(ptr, key_size, "a key")?;
            let value = f.slice(ptr + key_size, data_size, "a value")?;
            let shown = key_size.min(4);
            if key[..shown] != key_start[..shown] {
                return Err(format!(
                    "is corrupt (the key at offset {ptr} does not match its bucket entry)"
                ));
            }
            if out.len() >= MAX_RECORDS {
                return Err(format!("holds more than {MAX_RECORDS} records"));
            }
            out.push((key, value));
        }
        if used != count {
            return Err(format!(
                "is corrupt (the bucket at offset {at} says it holds {count} elements but has \
                 {used})"
            ));
        }
    }
    Ok(out)
}
