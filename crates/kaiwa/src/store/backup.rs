//! Backups of a kaiwa on SQLite (`kaiwa backup`): a consistent copy of the database, taken with
//! SQLite's online backup API while the server runs and writes, and of the media files that
//! copy names, into a new directory that is itself a data directory; and `kaiwa restore`, the
//! same copy from a backup into a data directory that has no database yet.
//!
//! Why the copy is complete: an uploaded file is written, synced and renamed into place before
//! the message that names it is committed ([`super::MediaStore::save`]), and a named file is
//! never changed or removed. The database is copied in one read transaction, a snapshot of
//! every commit before it began; every file that snapshot names was in the media directory
//! before the snapshot, and is still there when the files are copied after it. So the database
//! is copied first and the files second, never the other way round (files first would miss
//! those of the messages committed in between). Files of messages committed after the snapshot
//! are left out: nothing in the copy names them.

use super::DiskMedia;
use super::StoreError;
use super::media::key_file;
use super::sqlite::lock_database;
use crate::config::{BackupArgs, ConfigError, Database, RestoreArgs, StoreConfig};
use chrono::{DateTime, SecondsFormat, Utc};
use rusqlite::backup::{Backup, StepResult};
use rusqlite::{Connection, OpenFlags};
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The database file in a data directory, and in a backup.
const DATABASE: &str = "kaiwa.db";
/// The media directory in a backup (a data directory's default).
const MEDIA: &str = "media";
/// How long the copy waits, in all, for a database that is busy (a writer recovering it, an
/// exclusive lock) to let it read.
const BUSY_WAIT: Duration = Duration::from_secs(60);

/// What a backup or a restore wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copied {
    /// The backup directory, or the restored database.
    pub to: PathBuf,
    /// When the database's snapshot was taken: every message acked before is in the copy.
    pub as_of: DateTime<Utc>,
    pub messages: u64,
    pub replies: u64,
    /// Media files copied, and their bytes.
    pub files: u64,
    pub bytes: u64,
}

impl std::fmt::Display for Copied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: the database as of {} ({} messages, {} replies) and the {} media files it names ({} bytes)",
            self.to.display(),
            self.as_of.to_rfc3339_opts(SecondsFormat::Millis, true),
            self.messages,
            self.replies,
            self.files,
            self.bytes,
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error(
        "the database is PostgreSQL ({0}), which kaiwa backup and restore do not copy: use pg_dump and pg_restore, and copy the media directory (README, Backups)"
    )]
    Postgres(String),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("there is no database at {0}")]
    NoDatabase(PathBuf),
    #[error("{0} is not a kaiwa database: it has no messages and replies tables")]
    NotKaiwa(PathBuf),
    #[error("{0} exists and is not empty: a backup is written to a new or empty directory")]
    NotEmpty(PathBuf),
    #[error(
        "{0} exists: a backup to the same place was interrupted, or is under way; remove it once none is"
    )]
    Partial(PathBuf),
    #[error(
        "{0} exists: restore never replaces a database; move it away, or restore into another --data-dir"
    )]
    Exists(PathBuf),
    #[error("cannot {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("SQLite failed")]
    Sqlite(#[from] rusqlite::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the database at {0} stayed busy for {BUSY_WAIT:?}: nothing was copied")]
    Busy(PathBuf),
    #[error("the copy of the database fails SQLite's integrity check: {0}")]
    Integrity(String),
    #[error(
        "{} written, but {} file(s) its database names are not in {}, so it lacks them too: {}",
        .copied.to.display(), .missing.len(), .dir.display(), .missing.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
    )]
    MissingMedia {
        copied: Box<Copied>,
        dir: PathBuf,
        missing: Vec<String>,
    },
}

/// `kaiwa backup`: copies the database of `args.store` and the files it names to `args.to`.
pub fn backup(args: &BackupArgs) -> Result<Copied, BackupError> {
    let from = sqlite_file(&args.store)?;
    let media = args.media.resolve(&args.store.data_dir);
    if !from.is_file() {
        return Err(BackupError::NoDatabase(from));
    }
    let to = &args.to;
    if let Ok(mut entries) = fs::read_dir(to)
        && entries.next().is_some()
    {
        return Err(BackupError::NotEmpty(to.clone()));
    }
    let staging = beside(to, "partial");
    if staging.exists() {
        return Err(BackupError::Partial(staging));
    }
    fs::create_dir_all(&staging).map_err(io("create", &staging))?;
    let copied = match copy(&from, &media, &staging.join(DATABASE), &staging.join(MEDIA)) {
        Ok(copied) => copied,
        Err(err) => {
            fs::remove_dir_all(&staging).ok();
            return Err(err);
        }
    };
    sync_dir(&staging)?;
    // Replaces `to` if it is an empty directory.
    fs::rename(&staging, to).map_err(io("rename the backup to", to))?;
    sync_parent(to)?;
    copied.into_result(to, &media)
}

/// `kaiwa restore`: copies the backup in `args.from` into the data directory of `args.store`,
/// which must have no database. It holds the database's lock while it writes, so no kaiwa can
/// start on it meanwhile; the database appears, whole, last.
pub fn restore(args: &RestoreArgs) -> Result<Copied, BackupError> {
    let target = sqlite_file(&args.store)?;
    let media = args.media.resolve(&args.store.data_dir);
    let from = args.from.join(DATABASE);
    if !from.is_file() {
        return Err(BackupError::NoDatabase(from));
    }
    if target.exists() {
        return Err(BackupError::Exists(target));
    }
    if let Some(dir) = target.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(io("create", dir))?;
    }
    let _lock = lock_database(&target)?;
    // Looked at again under the lock: a kaiwa may have made it since.
    if target.exists() {
        return Err(BackupError::Exists(target));
    }
    let partial = beside(&target, "partial");
    // Under the lock, a partial database is what an interrupted restore left.
    fs::remove_file(&partial)
        .or_else(not_found)
        .map_err(io("remove", &partial))?;
    let from_media = args.from.join(MEDIA);
    let copied = match copy(&from, &from_media, &partial, &media) {
        Ok(copied) => copied,
        Err(err) => {
            fs::remove_file(&partial).ok();
            return Err(err);
        }
    };
    fs::rename(&partial, &target).map_err(io("rename the database to", &target))?;
    sync_parent(&target)?;
    copied.into_result(&target, &from_media)
}

/// The SQLite file the storage flags name; PostgreSQL is refused.
fn sqlite_file(store: &StoreConfig) -> Result<PathBuf, BackupError> {
    match store.database()? {
        Database::Sqlite(path) => Ok(path),
        postgres @ Database::Postgres(_) => Err(BackupError::Postgres(postgres.describe())),
    }
}

/// What [`copy`] did, before it is known where it ends up.
struct Copy {
    copied: Copied,
    /// The keys of the files the database names and the source lacks.
    missing: Vec<String>,
}

impl Copy {
    /// The copy, now at `to`; an error if it lacks files the database names.
    fn into_result(self, to: &Path, media: &Path) -> Result<Copied, BackupError> {
        let copied = Copied {
            to: to.to_owned(),
            ..self.copied
        };
        if self.missing.is_empty() {
            return Ok(copied);
        }
        Err(BackupError::MissingMedia {
            copied: Box::new(copied),
            dir: media.to_owned(),
            missing: self.missing,
        })
    }
}

/// Copies the database `db_from` to the new file `db_to`, then the files the copy names from
/// `media_from` to `media_to`: in this order (see the module's documentation).
fn copy(
    db_from: &Path,
    media_from: &Path,
    db_to: &Path,
    media_to: &Path,
) -> Result<Copy, BackupError> {
    let snapshot = copy_database(db_from, db_to)?;
    DiskMedia::open(media_to)?;
    let mut copy = Copy {
        copied: Copied {
            to: db_to.to_owned(),
            as_of: snapshot.as_of,
            messages: snapshot.messages,
            replies: snapshot.replies,
            files: 0,
            bytes: 0,
        },
        missing: Vec::new(),
    };
    let mut folders = Vec::new();
    for key in snapshot.files {
        let Some(file) = key_file(&key) else {
            copy.missing.push(key);
            continue;
        };
        let (source, target) = (media_from.join(&file), media_to.join(&file));
        match fs::copy(&source, &target) {
            Ok(bytes) => {
                File::open(&target)
                    .and_then(|file| file.sync_all())
                    .map_err(io("sync", &target))?;
                copy.copied.files += 1;
                copy.copied.bytes += bytes;
                if let Some(folder) = target.parent()
                    && !folders.iter().any(|known| known == folder)
                {
                    folders.push(folder.to_owned());
                }
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound && !source.exists() => {
                copy.missing.push(key);
            }
            Err(err) => return Err(io("copy a media file to", &target)(err)),
        }
    }
    for folder in folders {
        sync_dir(&folder)?;
    }
    Ok(copy)
}

/// A copy of a database, and what it holds.
struct Snapshot {
    as_of: DateTime<Utc>,
    messages: u64,
    replies: u64,
    /// The media keys its messages name.
    files: Vec<String>,
}

/// Copies the database at `from`, which a kaiwa may be writing, to the new file `to` with
/// SQLite's online backup, in one step: one read transaction, so the copy is the database as
/// it was when that began, whatever is committed meanwhile (in WAL mode a reader holds up no
/// writer; copying in several steps would start again after every commit of the server's).
/// The copy is checked with `PRAGMA integrity_check`, and left in rollback-journal mode: one
/// self-contained file, with no WAL beside it (kaiwa turns WAL on again when it opens it).
fn copy_database(from: &Path, to: &Path) -> Result<Snapshot, BackupError> {
    let source = Connection::open_with_flags(
        from,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    source.busy_timeout(Duration::from_secs(5))?;
    let mut copy = Connection::open(to)?;
    let deadline = Instant::now() + BUSY_WAIT;
    let as_of = {
        let backup = Backup::new(&source, &mut copy)?;
        loop {
            let began = Utc::now();
            match backup.step(-1)? {
                StepResult::Done => break began,
                _ if Instant::now() >= deadline => return Err(BackupError::Busy(from.to_owned())),
                // Busy or locked: a writer holds the database for a moment.
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    };
    drop(source);
    let tables: i64 = copy.query_row(
        "SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name IN ('messages', 'replies')",
        [],
        |row| row.get(0),
    )?;
    if tables != 2 {
        return Err(BackupError::NotKaiwa(from.to_owned()));
    }
    let mode: String =
        copy.pragma_update_and_check(None, "journal_mode", "DELETE", |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("delete") {
        return Err(BackupError::Integrity(format!(
            "the copy stayed in journal mode {mode}"
        )));
    }
    let problems = copy
        .prepare("PRAGMA integrity_check")?
        .query_map([], |row| row.get::<_, String>(0))?
        .collect::<Result<Vec<_>, _>>()?;
    if problems != ["ok"] {
        return Err(BackupError::Integrity(
            problems.into_iter().take(10).collect::<Vec<_>>().join("; "),
        ));
    }
    let count = |table: &str| -> Result<u64, BackupError> {
        let count: i64 = copy.query_row(&format!("SELECT count(*) FROM {table}"), [], |row| {
            row.get(0)
        })?;
        Ok(super::non_negative(table, count)?)
    };
    let (messages, replies) = (count("messages")?, count("replies")?);
    let files = copy
        .prepare("SELECT content FROM messages WHERE message_type <> 'text' AND content <> ''")?
        .query_map([], |row| row.get::<_, String>(0))?
        .collect::<Result<Vec<_>, _>>()?;
    copy.close().map_err(|(_, err)| err)?;
    File::open(to)
        .and_then(|file| file.sync_all())
        .map_err(io("sync", to))?;
    Ok(Snapshot {
        as_of,
        messages,
        replies,
        files,
    })
}

/// `path` with `.<extension>` added to its name: `DIR.partial` beside `DIR`.
fn beside(path: &Path, extension: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(".");
    name.push(extension);
    path.with_file_name(name)
}

fn sync_dir(dir: &Path) -> Result<(), BackupError> {
    File::open(dir)
        .and_then(|dir| dir.sync_all())
        .map_err(io("sync", dir))
}

/// Makes a rename or a new file in `path`'s directory durable.
fn sync_parent(path: &Path) -> Result<(), BackupError> {
    match path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        Some(dir) => sync_dir(dir),
        None => sync_dir(Path::new(".")),
    }
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> BackupError {
    let path = path.to_owned();
    move |source| BackupError::Io {
        action,
        path,
        source,
    }
}

fn not_found(err: io::Error) -> io::Result<()> {
    if err.kind() == io::ErrorKind::NotFound {
        Ok(())
    } else {
        Err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Cli, Command};
    use crate::store::{NewMessage, SqliteOptions, SqliteStore, Store};
    use bytes::Bytes;
    use clap::Parser;
    use kaiwa_protocol::MessageType;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    fn message(n: u64, kind: MessageType, content: &str) -> NewMessage {
        NewMessage {
            kind,
            ..super::super::contract::message("backup-test", Some(&format!("m{n}")), content)
        }
    }

    /// The `kaiwa` command line `subcommand` with the storage flags of `data_dir` and `more`.
    fn command(subcommand: &str, data_dir: &Path, more: [&str; 2]) -> Command {
        let database = format!("sqlite://{}", data_dir.join(DATABASE).display());
        let data_dir = data_dir.display().to_string();
        let storage = ["--database-url", &database, "--data-dir", &data_dir];
        Cli::try_parse_from(["kaiwa", subcommand].into_iter().chain(storage).chain(more))
            .expect("valid flags")
            .command
    }

    fn backup_args(data_dir: &Path, to: &Path) -> BackupArgs {
        match command("backup", data_dir, ["--to", &to.display().to_string()]) {
            Command::Backup(args) => args,
            other => panic!("not a backup: {other:?}"),
        }
    }

    fn restore_args(from: &Path, data_dir: &Path) -> RestoreArgs {
        match command("restore", data_dir, ["--from", &from.display().to_string()]) {
            Command::Restore(args) => args,
            other => panic!("not a restore: {other:?}"),
        }
    }

    /// Stores messages one after another until `stop`, counting those committed.
    fn keep_writing(
        store: Arc<SqliteStore>,
        committed: Arc<AtomicU64>,
        stop: tokio_util::sync::CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            for n in 0.. {
                if stop.is_cancelled() {
                    return;
                }
                store
                    .insert_message(message(n, MessageType::Text, &format!("text {n}")))
                    .await
                    .expect("stored");
                committed.fetch_add(1, Ordering::SeqCst);
            }
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_database_written_during_the_copy_is_copied_as_one_consistent_snapshot() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join(DATABASE);
        let store = Arc::new(
            SqliteStore::open(&path, SqliteOptions::default())
                .await
                .expect("opens"),
        );
        let committed = Arc::new(AtomicU64::new(0));
        let stop = tokio_util::sync::CancellationToken::new();
        let writer = keep_writing(store.clone(), committed.clone(), stop.clone());
        while committed.load(Ordering::SeqCst) < 300 {
            tokio::task::yield_now().await;
        }
        let wal = fs::metadata(path.with_extension("db-wal")).expect("a WAL");
        assert!(wal.len() > 0, "the database has a WAL in use");

        let before = committed.load(Ordering::SeqCst);
        let copy_path = dir.path().join("copy.db");
        let (from, to) = (path.clone(), copy_path.clone());
        let snapshot = tokio::task::spawn_blocking(move || copy_database(&from, &to))
            .await
            .expect("the copy ran")
            .expect("copied");
        let after = committed.load(Ordering::SeqCst);
        stop.cancel();
        writer.await.expect("the writer stops");
        store.close().await;

        assert!(
            (before..=after).contains(&snapshot.messages),
            "{before} committed before the copy, {after} after, {} in it",
            snapshot.messages
        );
        assert!(!dir.path().join("copy.db-wal").exists(), "one file, no WAL");
        let copy = Connection::open(&copy_path).expect("opens");
        let check: String = copy
            .query_row("PRAGMA integrity_check", [], |row| row.get(0))
            .expect("checked");
        assert_eq!(check, "ok");
        // A snapshot of a single writer's commits is a prefix of them: ids 1 to n, none missing.
        let (count, last): (i64, i64) = copy
            .query_row("SELECT count(*), max(id) FROM messages", [], |row| {
                Ok((row.get(0)?, row.get(1)?))
            })
            .expect("counted");
        let messages = i64::try_from(snapshot.messages).expect("a count");
        assert_eq!((count, last), (messages, messages));
    }

    /// A data directory with a database naming two files, one of them missing.
    async fn data_dir_missing_a_file(data_dir: &Path) -> String {
        let store = SqliteStore::open(&data_dir.join(DATABASE), SqliteOptions::default())
            .await
            .expect("opens");
        let media = DiskMedia::open(&data_dir.join(MEDIA)).expect("media folders");
        let format = crate::domain::MediaFormat {
            name: "PNG",
            mime: "image/png",
            extensions: &["png"],
        };
        let mut keys = Vec::new();
        for n in 0..2 {
            let key = media
                .save(MessageType::Image, &format, Bytes::from(vec![n; 64]))
                .await
                .expect("saved");
            store
                .insert_message(message(n.into(), MessageType::Image, &key))
                .await
                .expect("stored");
            keys.push(key);
        }
        store.close().await;
        let lost = keys.pop().expect("a key");
        fs::remove_file(
            data_dir.join(
                key_file(&lost)
                    .map(|f| Path::new(MEDIA).join(f))
                    .expect("ours"),
            ),
        )
        .expect("removed");
        lost
    }

    use crate::store::MediaStore as _;

    #[tokio::test]
    async fn a_backup_is_written_whole_even_when_a_named_file_is_missing_and_fails_saying_which() {
        let dir = tempfile::tempdir().expect("temp dir");
        let data_dir = dir.path().join("data");
        let lost = data_dir_missing_a_file(&data_dir).await;
        let to = dir.path().join("backup");
        let err = backup(&backup_args(&data_dir, &to)).expect_err("a file is missing");
        let BackupError::MissingMedia {
            copied, missing, ..
        } = &err
        else {
            panic!("{err}");
        };
        assert_eq!(missing, std::slice::from_ref(&lost));
        assert_eq!((copied.messages, copied.files), (2, 1));
        assert!(err.to_string().contains(&lost), "{err}");
        assert!(to.join(DATABASE).is_file(), "the backup is there");
        assert!(!beside(&to, "partial").exists());
    }

    #[tokio::test]
    async fn neither_backup_nor_restore_writes_over_anything() {
        let dir = tempfile::tempdir().expect("temp dir");
        let data_dir = dir.path().join("data");
        data_dir_missing_a_file(&data_dir).await;
        let taken = dir.path().join("taken");
        fs::create_dir_all(&taken).expect("made");
        fs::write(taken.join("notes.txt"), "mine").expect("written");
        let err = backup(&backup_args(&data_dir, &taken)).expect_err("not empty");
        assert!(matches!(err, BackupError::NotEmpty(_)), "{err}");
        assert_eq!(
            fs::read_to_string(taken.join("notes.txt")).expect("kept"),
            "mine"
        );

        // A restore into the data directory it came from.
        let backup_dir = dir.path().join("backup");
        backup(&backup_args(&data_dir, &backup_dir)).ok();
        let err = restore(&restore_args(&backup_dir, &data_dir)).expect_err("a database is there");
        assert!(matches!(err, BackupError::Exists(_)), "{err}");
    }

    #[tokio::test]
    async fn a_restore_is_refused_while_a_kaiwa_holds_the_target() {
        let dir = tempfile::tempdir().expect("temp dir");
        let data_dir = dir.path().join("data");
        data_dir_missing_a_file(&data_dir).await;
        let backup_dir = dir.path().join("backup");
        backup(&backup_args(&data_dir, &backup_dir)).ok();
        let target = dir.path().join("target");
        fs::create_dir_all(&target).expect("made");
        let held = lock_database(&target.join(DATABASE)).expect("locked");
        let err = restore(&restore_args(&backup_dir, &target)).expect_err("locked");
        assert!(
            matches!(err, BackupError::Store(StoreError::Locked(_))),
            "{err}"
        );
        drop(held);
        let err = restore(&restore_args(&backup_dir, &target)).expect_err("a file is missing");
        assert!(matches!(err, BackupError::MissingMedia { .. }), "{err}");
        assert!(target.join(DATABASE).is_file(), "restored");
    }

    #[test]
    fn postgres_is_refused_with_the_way_to_back_it_up() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut args = backup_args(dir.path(), &dir.path().join("b"));
        args.store.database_url = Some(crate::flags::Secret::new(
            "postgres://kaiwa:hunter2@db.example/kaiwa",
        ));
        let err = backup(&args).expect_err("PostgreSQL");
        let said = err.to_string();
        assert!(said.contains("pg_dump") && said.contains("media"), "{said}");
        assert!(
            !said.contains("hunter2"),
            "the password is never shown: {said}"
        );
        assert!(!dir.path().join("b").exists());
    }
}
