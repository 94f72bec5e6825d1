//! The write-ahead log: the file `herald.wal`.
//!
//! Owns the log's layout, its checksum, appending and undoing a record, reading the records back
//! after a crash, and replacing the log with an empty one. It does not know what a record means
//! (that is `codec`) nor apply it (that is `redb_store`).
//!
//! Why it exists: a batch is durable once its record is here (with `fdatasync` in always mode;
//! in interval mode once `write` returns, the bytes are in the kernel and survive the process,
//! and the log is synced every interval, as DESIGN.md allows losing the last interval on power
//! loss, never on a process crash). Its ops reach redb later, many batches in one transaction
//! (`redb_store`'s checkpoints), which is much cheaper than a redb commit per batch. Once every
//! op of the log is in redb, durably, the log can be replaced by an empty one.
//!
//! Layout: a 17-byte header, `b"HRLDWAL\n"`, a version byte, and a big-endian `u64` generation;
//! then records of `len: u32`, `crc: u32` (both big-endian) and `len` bytes of payload. The CRC-32
//! covers the generation, `len` and the payload, so a record left over from an older log (say,
//! in blocks a crashed file system hands back) never passes as one of this log's.
//!
//! Reading stops at the first record that is incomplete or fails its checksum: that is the tail
//! a crash tore off in the middle of a `write`, or, after a power loss, blocks that never reached
//! the disk. Either way it was never flushed, so DESIGN.md allows losing it.
//!
//! The file grows ahead of its records, by [`PREALLOCATE`] bytes of zeros at a time (on Unix),
//! so that syncing a record (`fdatasync`) writes data only: a file whose size changes at every
//! record makes each sync commit the file system's journal, and waits behind whatever else that
//! commit carries (the database's own fsync of a checkpoint, say, several milliseconds). The
//! zeros after the last record are not a torn tail: a record's length is never 0.
//!
//! The log is replaced atomically: an empty log is written to `herald.wal.tmp`, fsynced, and
//! renamed over `herald.wal`, and the directory is fsynced. A crash at any point leaves either
//! the old log (replaying it again is harmless: ops are idempotent) or the new empty one.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::StoreError;

pub(crate) const WAL_FILE: &str = "herald.wal";
const TMP_FILE: &str = "herald.wal.tmp";
const MAGIC: [u8; 8] = *b"HRLDWAL\n";
const WAL_VERSION: u8 = 1;
pub(crate) const HEADER_LEN: u64 = 17;
const RECORD_HEADER_LEN: usize = 8;
/// How far the file is extended with zeros when a record does not fit in what is there.
const PREALLOCATE: u64 = 1024 * 1024;

/// An open log, positioned at its end.
pub(crate) struct Wal {
    path: PathBuf,
    dir: PathBuf,
    file: File,
    generation: u64,
    /// Bytes of complete records plus the header: where the next record goes.
    len: u64,
    /// The file's size: `len` and the zeros written ahead of the records.
    allocated: u64,
    /// The rename that made this the log is not known to be on disk (the directory's fsync
    /// failed): [`Wal::sync`] retries it, so no record is taken as durable before it is.
    dir_unsynced: bool,
    /// Written (appended, extended or cut) since the last successful [`Wal::sync`], which
    /// does nothing otherwise: a flush in interval mode syncs the log and then hands the waiting
    /// ops to a checkpoint, which syncs it first too, and every read syncs it before it
    /// checkpoints.
    unsynced: bool,
}

/// What [`Wal::read`] found.
pub(crate) struct Recovered {
    pub(crate) path: PathBuf,
    pub(crate) generation: u64,
    /// Payloads of the complete, checksum-valid records, in order.
    pub(crate) records: Vec<Vec<u8>>,
    /// Bytes after the last valid record (a torn or never-synced tail).
    pub(crate) ignored_bytes: u64,
}

impl Wal {
    /// Replaces any log in `dir` with an empty one of `generation`.
    pub(crate) fn create(dir: &Path, generation: u64) -> Result<Wal, StoreError> {
        let (wal, dir_synced) = Wal::replace(dir, generation)?;
        dir_synced?;
        Ok(wal)
    }

    /// Writes an empty log and renames it over the old one. An error before the rename leaves
    /// the old log in place; after it, the new log is returned with the result of syncing the
    /// directory, since the old file handle then points at an unlinked file.
    fn replace(dir: &Path, generation: u64) -> Result<(Wal, Result<(), StoreError>), StoreError> {
        let path = dir.join(WAL_FILE);
        let tmp = dir.join(TMP_FILE);
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| StoreError::io(&tmp, e))?;
        let mut header = Vec::with_capacity(HEADER_LEN as usize);
        header.extend_from_slice(&MAGIC);
        header.push(WAL_VERSION);
        header.extend_from_slice(&generation.to_be_bytes());
        file.write_all(&header)
            .and_then(|()| file.sync_all())
            .map_err(|e| StoreError::io(&tmp, e))?;
        fs::rename(&tmp, &path).map_err(|e| StoreError::io(&path, e))?;
        let wal = Wal {
            path,
            dir: dir.to_path_buf(),
            file,
            generation,
            len: HEADER_LEN,
            allocated: HEADER_LEN,
            dir_unsynced: false,
            unsynced: false,
        };
        Ok((wal, sync_dir(dir)))
    }

    /// Reads the log of `dir`, if there is one.
    pub(crate) fn read(dir: &Path) -> Result<Option<Recovered>, StoreError> {
        let path = dir.join(WAL_FILE);
        let data = match fs::read(&path) {
            Ok(data) => data,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StoreError::io(&path, e)),
        };
        let (version, generation) = match parse_header(&data) {
            Some(header) => header,
            None => {
                return Err(StoreError::Corrupt(format!(
                    "{}: not a Herald write-ahead log (bad header)",
                    path.display()
                )));
            }
        };
        if version > WAL_VERSION {
            return Err(StoreError::NewerFormat {
                path,
                found: u64::from(version),
                supported: u64::from(WAL_VERSION),
            });
        }
        if version != WAL_VERSION {
            return Err(StoreError::Corrupt(format!(
                "{}: unknown write-ahead log version {version}",
                path.display()
            )));
        }
        let (records, valid_len) = parse_records(&data, generation);
        let tail = data.get(valid_len..).unwrap_or_default();
        let ignored_bytes = if tail.iter().all(|&byte| byte == 0) {
            0
        } else {
            tail.len() as u64
        };
        Ok(Some(Recovered {
            path,
            generation,
            records,
            ignored_bytes,
        }))
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes in the log, header included.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Appends one record (header and payload in one `writev`), without fsync. On error the file may hold
    /// part of the record: call [`Wal::truncate`] with the length from before.
    pub(crate) fn append(&mut self, payload: &[u8]) -> Result<(), StoreError> {
        let len = u32::try_from(payload.len()).map_err(|_| {
            StoreError::Engine(format!(
                "{}: a batch of {} bytes is too large for one log record",
                self.path.display(),
                payload.len()
            ))
        })?;
        let len_bytes = len.to_be_bytes();
        let crc = crc32(&[&self.generation.to_be_bytes(), &len_bytes, payload]);
        let mut header = [0_u8; RECORD_HEADER_LEN];
        header[..4].copy_from_slice(&len_bytes);
        header[4..].copy_from_slice(&crc.to_be_bytes());
        let end = self.len + (RECORD_HEADER_LEN + payload.len()) as u64;
        self.unsynced = true;
        if end > self.allocated {
            self.preallocate(end)?;
        }
        write_all_vectored(&mut self.file, &header, payload)
            .map_err(|e| StoreError::io(&self.path, e))?;
        self.len = end;
        Ok(())
    }

    /// Extends the file with zeros to past `end`, without moving the write position.
    #[cfg(unix)]
    fn preallocate(&mut self, end: u64) -> Result<(), StoreError> {
        use std::os::unix::fs::FileExt;
        let target = end.div_ceil(PREALLOCATE) * PREALLOCATE;
        let zeros = vec![0_u8; usize::try_from(target - self.allocated).unwrap_or(0)];
        self.file
            .write_all_at(&zeros, self.allocated)
            .map_err(|e| StoreError::io(&self.path, e))?;
        self.allocated = target;
        Ok(())
    }

    #[cfg(not(unix))]
    fn preallocate(&mut self, end: u64) -> Result<(), StoreError> {
        self.allocated = end;
        Ok(())
    }

    /// Makes the records appended so far survive a power loss (`fdatasync`; nothing to do if
    /// nothing was written since the last sync).
    pub(crate) fn sync(&mut self) -> Result<(), StoreError> {
        if self.dir_unsynced {
            sync_dir(&self.dir)?;
            self.dir_unsynced = false;
        }
        if !self.unsynced {
            return Ok(());
        }
        self.file
            .sync_data()
            .map_err(|e| StoreError::io(&self.path, e))?;
        self.unsynced = false;
        Ok(())
    }

    /// Cuts the log back to `len` bytes, dropping the records appended since.
    pub(crate) fn truncate(&mut self, len: u64) -> Result<(), StoreError> {
        self.unsynced = true;
        self.file
            .set_len(len)
            .and_then(|()| self.file.seek(SeekFrom::Start(len)))
            .map_err(|e| StoreError::io(&self.path, e))?;
        self.len = len;
        self.allocated = len;
        Ok(())
    }

    /// Replaces the log with an empty one of the next generation (see the module docs).
    /// If only the directory's fsync fails, the new log is in use and the next
    /// [`Wal::sync`] tries that fsync again before anything else.
    pub(crate) fn reset(&mut self) -> Result<(), StoreError> {
        let (fresh, dir_synced) = Wal::replace(&self.dir, self.generation.wrapping_add(1))?;
        *self = fresh;
        if dir_synced.is_err() {
            self.dir_unsynced = true;
        }
        dir_synced
    }
}

fn parse_header(data: &[u8]) -> Option<(u8, u64)> {
    let header = data.get(..HEADER_LEN as usize)?;
    if header[..8] != MAGIC {
        return None;
    }
    let generation = u64::from_be_bytes(header[9..17].try_into().ok()?);
    Some((header[8], generation))
}

/// Returns the payloads of the valid records and the length of the valid prefix of `data`.
fn parse_records(data: &[u8], generation: u64) -> (Vec<Vec<u8>>, usize) {
    let generation = generation.to_be_bytes();
    let mut records = Vec::new();
    let mut offset = HEADER_LEN as usize;
    while let Some(record_header) = data.get(offset..offset + RECORD_HEADER_LEN) {
        let (len_bytes, crc_bytes) = record_header.split_at(4);
        let len = u32::from_be_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]);
        let crc = u32::from_be_bytes([crc_bytes[0], crc_bytes[1], crc_bytes[2], crc_bytes[3]]);
        if len == 0 {
            // The zeros the file was extended with: no record is empty.
            break;
        }
        let start = offset + RECORD_HEADER_LEN;
        let Some(payload) = data.get(start..start + len as usize) else {
            break;
        };
        if crc32(&[&generation, len_bytes, payload]) != crc {
            break;
        }
        records.push(payload.to_vec());
        offset = start + payload.len();
    }
    (records, offset)
}

/// Writes `header` then `payload` at the file's position, in one `writev` when the kernel takes
/// it all (as it does for a regular file), without copying the payload into a record buffer.
fn write_all_vectored(file: &mut File, header: &[u8], payload: &[u8]) -> io::Result<()> {
    let mut slices = [io::IoSlice::new(header), io::IoSlice::new(payload)];
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        match file.write_vectored(rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(written) => io::IoSlice::advance_slices(&mut rest, written),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(unix)]
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io(dir, e))
}

// Other systems cannot open a directory to sync it; the rename is as durable as they make it.
#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> Result<(), StoreError> {
    Ok(())
}

/// CRC-32 (IEEE 802.3, the one of zlib and Ethernet) of the concatenation of `parts`.
fn crc32(parts: &[&[u8]]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    for part in parts {
        hasher.update(part);
    }
    hasher.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(&[b"123456789"]), 0xCBF4_3926);
        assert_eq!(crc32(&[b"1234", b"56789"]), 0xCBF4_3926);
        assert_eq!(crc32(&[]), 0);
    }

    #[test]
    fn records_come_back_and_a_torn_tail_is_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut wal = Wal::create(dir.path(), 7).expect("create");
        wal.append(b"first").expect("append");
        wal.append(b"second").expect("append");
        let file = fs::read(wal.path()).expect("read");
        // The file goes on with zeros (its preallocation), which are not a torn tail.
        let records_end = usize::try_from(wal.len()).expect("small");
        assert!(file.len() > records_end);
        assert!(file[records_end..].iter().all(|&byte| byte == 0));
        let full = file[..records_end].to_vec();

        let read = Wal::read(dir.path()).expect("read").expect("present");
        assert_eq!(read.generation, 7);
        assert_eq!(read.records, vec![b"first".to_vec(), b"second".to_vec()]);
        assert_eq!(read.ignored_bytes, 0);

        // Every cut inside the second record loses that record only.
        let second_start = HEADER_LEN as usize + RECORD_HEADER_LEN + 5;
        for cut in second_start..full.len() {
            fs::write(dir.path().join(WAL_FILE), &full[..cut]).expect("write");
            let read = Wal::read(dir.path()).expect("read").expect("present");
            assert_eq!(read.records, vec![b"first".to_vec()], "cut at {cut}");
            // A torn part that is all zeros (the top bytes of its length) reads as the
            // preallocation's zeros: nothing to warn about, and nothing lost either way.
            let torn = &full[second_start..cut];
            let expected = if torn.iter().all(|&byte| byte == 0) {
                0
            } else {
                torn.len() as u64
            };
            assert_eq!(read.ignored_bytes, expected, "cut at {cut}");
        }
        // So does a flipped bit in its payload.
        let mut flipped = full.clone();
        flipped[full.len() - 1] ^= 1;
        fs::write(dir.path().join(WAL_FILE), &flipped).expect("write");
        let read = Wal::read(dir.path()).expect("read").expect("present");
        assert_eq!(read.records, vec![b"first".to_vec()]);

        // A torn second record followed by the preallocated zeros: the torn bytes count.
        let mut torn = full[..full.len() - 2].to_vec();
        torn.resize(torn.len() + 4096, 0);
        fs::write(dir.path().join(WAL_FILE), &torn).expect("write");
        let read = Wal::read(dir.path()).expect("read").expect("present");
        assert_eq!(read.records, vec![b"first".to_vec()]);
        assert!(read.ignored_bytes > 0);
    }

    #[test]
    fn the_file_grows_ahead_of_its_records_and_a_truncate_gives_that_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut wal = Wal::create(dir.path(), 1).expect("create");
        let size = |wal: &Wal| fs::metadata(wal.path()).expect("stat").len();
        assert_eq!(size(&wal), HEADER_LEN);
        wal.append(b"one").expect("append");
        let grown = size(&wal);
        assert!(grown >= PREALLOCATE, "{grown}");
        let mark = wal.len();
        for _ in 0..10 {
            wal.append(&[7; 100]).expect("append");
        }
        assert_eq!(size(&wal), grown, "records fill the zeros");
        wal.truncate(mark).expect("truncate");
        assert_eq!(size(&wal), mark);
        wal.append(b"two").expect("append");
        let read = Wal::read(dir.path()).expect("read").expect("present");
        assert_eq!(read.records, vec![b"one".to_vec(), b"two".to_vec()]);
        assert_eq!(read.ignored_bytes, 0);
    }

    #[test]
    fn records_of_another_generation_are_not_replayed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut wal = Wal::create(dir.path(), 1).expect("create");
        wal.append(b"old").expect("append");
        let old = fs::read(wal.path()).expect("read");
        wal.reset().expect("reset");
        assert_eq!(fs::metadata(wal.path()).expect("stat").len(), HEADER_LEN);
        // Stale bytes of generation 1 after the header of generation 2.
        let mut stale = fs::read(wal.path()).expect("read");
        stale.extend_from_slice(&old[HEADER_LEN as usize..]);
        fs::write(wal.path(), &stale).expect("write");
        let read = Wal::read(dir.path()).expect("read").expect("present");
        assert_eq!(read.generation, 2);
        assert!(read.records.is_empty());
    }

    #[test]
    fn a_sync_follows_every_write_and_only_writes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut wal = Wal::create(dir.path(), 1).expect("create");
        assert!(!wal.unsynced, "a new log is on disk");
        wal.append(b"one").expect("append");
        assert!(wal.unsynced);
        wal.sync().expect("sync");
        assert!(!wal.unsynced);
        let mark = wal.len();
        wal.append(b"two").expect("append");
        wal.sync().expect("sync");
        wal.truncate(mark).expect("truncate");
        assert!(wal.unsynced, "a cut is a write too");
        wal.sync().expect("sync");
        assert!(!wal.unsynced);
        wal.reset().expect("reset");
        assert!(!wal.unsynced, "a fresh log is on disk");
    }

    #[test]
    fn truncate_drops_the_last_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut wal = Wal::create(dir.path(), 1).expect("create");
        wal.append(b"kept").expect("append");
        let mark = wal.len();
        wal.append(b"undone").expect("append");
        wal.truncate(mark).expect("truncate");
        wal.append(b"next").expect("append");
        let read = Wal::read(dir.path()).expect("read").expect("present");
        assert_eq!(read.records, vec![b"kept".to_vec(), b"next".to_vec()]);
    }

    #[test]
    fn a_bad_header_or_newer_version_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(WAL_FILE);
        fs::write(&path, b"not a log at all, but long enough").expect("write");
        let error = Wal::read(dir.path()).err().expect("bad header refused");
        assert!(matches!(error, StoreError::Corrupt(_)), "{error}");
        assert!(
            error.to_string().contains(&path.display().to_string()),
            "{error}"
        );

        Wal::create(dir.path(), 1).expect("create");
        let mut data = fs::read(&path).expect("read");
        data[8] = WAL_VERSION + 1;
        fs::write(&path, &data).expect("write");
        let error = Wal::read(dir.path()).err().expect("newer refused");
        assert!(
            matches!(
                error,
                StoreError::NewerFormat {
                    found: 2,
                    supported: 1,
                    ..
                }
            ),
            "{error}"
        );
        assert!(
            Wal::read(&dir.path().join("missing"))
                .expect("read")
                .is_none()
        );
    }
}
