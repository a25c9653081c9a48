//! The VMM's log: every `tracing` event, and every `log` record (virtio-queue writes
//! through `log`), as one line on stderr:
//!
//! ```text
//! 2026-12-05T03:11:58Z WARN mvm_vmm::seccomp: seccomp filters are not enforced (MVM_SECCOMP); development only mode=Log
//! ```
//!
//! the time (UTC, as the audit log writes it), the level, where from, the message, then
//! the fields.
//! The VMM opens no spans, so this needs none of a full subscriber's machinery (a span
//! registry, per-thread state): a line is formatted in memory and written with one
//! `write(2)`, which every thread's seccomp filter allows. The level comes from
//! `RUST_LOG` ([`level_from`]).

use std::fmt::{self, Write as _};
use std::io::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use mvm_loader::plan::UtcTime;

use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};

/// The log level from `RUST_LOG`: a level (`off`, `error`, `warn`, `info`, `debug`,
/// `trace`), or directives (`mvm_vmm=debug,kvm=info`) of which the most verbose level
/// counts for every target. Unset or unreadable: `warn`.
pub fn level_from(value: Option<&str>) -> LevelFilter {
    value
        .into_iter()
        .flat_map(|v| v.split(','))
        .map(|directive| directive.rsplit('=').next().unwrap_or(directive).trim())
        // LevelFilter reads "" as ERROR; here it means nothing was said.
        .filter(|level| !level.is_empty())
        .filter_map(|level| level.parse::<LevelFilter>().ok())
        .max()
        .unwrap_or(LevelFilter::WARN)
}

/// Sends `tracing` events and `log` records up to `max` to stderr, from now on. A second
/// call changes nothing (the first logger stays).
pub fn init(max: LevelFilter) {
    let _ = tracing::subscriber::set_global_default(StderrLog { max });
    if log::set_boxed_logger(Box::new(LogBridge)).is_ok() {
        log::set_max_level(log_level(max));
    }
}

/// The `log` crate's filter for a `tracing` one.
fn log_level(max: LevelFilter) -> log::LevelFilter {
    match max.into_level() {
        None => log::LevelFilter::Off,
        Some(Level::ERROR) => log::LevelFilter::Error,
        Some(Level::WARN) => log::LevelFilter::Warn,
        Some(Level::INFO) => log::LevelFilter::Info,
        Some(Level::DEBUG) => log::LevelFilter::Debug,
        Some(Level::TRACE) => log::LevelFilter::Trace,
    }
}

/// One line, whole: `TIME LEVEL target: message fields`, written with one `write(2)`.
fn emit(level: &dyn fmt::Display, target: &str, body: &str) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    // The audit log's clock format (`mvm_loader::plan::UtcTime`), to the second.
    let time = i64::try_from(now.as_secs())
        .ok()
        .and_then(UtcTime::from_unix)
        .map_or_else(|| "-".to_owned(), |t| t.to_string());
    let line = format!("{time} {level} {target}: {body}\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
}

struct StderrLog {
    max: LevelFilter,
}

impl Subscriber for StderrLog {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        *metadata.level() <= self.max
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(self.max)
    }

    fn new_span(&self, _span: &Attributes<'_>) -> Id {
        // No span is ever entered for output; one id serves them all.
        Id::from_u64(1)
    }

    fn record(&self, _span: &Id, _values: &Record<'_>) {}

    fn record_follows_from(&self, _span: &Id, _follows: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let mut line = Line::default();
        event.record(&mut line);
        let meta = event.metadata();
        emit(meta.level(), meta.target(), &line.finish());
    }

    fn enter(&self, _span: &Id) {}

    fn exit(&self, _span: &Id) {}
}

/// An event's message, then its other fields as `name=value`.
#[derive(Default)]
struct Line {
    message: String,
    fields: String,
}

impl Line {
    fn finish(self) -> String {
        match (self.message.is_empty(), self.fields.is_empty()) {
            (_, true) => self.message,
            (true, false) => self.fields,
            (false, false) => format!("{} {}", self.message, self.fields),
        }
    }
}

impl Visit for Line {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            let sep = if self.fields.is_empty() { "" } else { " " };
            let _ = write!(self.fields, "{sep}{}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        // Strings as written, not quoted (paths, names).
        self.record_debug(field, &format_args!("{value}"));
    }
}

struct LogBridge;

impl log::Log for LogBridge {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            let level = record.level().as_str().to_ascii_uppercase();
            emit(&level, record.target(), &record.args().to_string());
        }
    }

    fn flush(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn level_from_reads_a_level_or_the_most_verbose_directive() {
        assert_eq!(level_from(None), LevelFilter::WARN);
        assert_eq!(level_from(Some("")), LevelFilter::WARN);
        assert_eq!(level_from(Some("nonsense")), LevelFilter::WARN);
        assert_eq!(level_from(Some("debug")), LevelFilter::DEBUG);
        assert_eq!(level_from(Some("OFF")), LevelFilter::OFF);
        assert_eq!(
            level_from(Some("mvm_vmm=debug,kvm_ioctls=info")),
            LevelFilter::DEBUG
        );
        assert_eq!(
            level_from(Some("error,mvm_devices=trace")),
            LevelFilter::TRACE
        );
    }

    #[test]
    fn a_line_is_the_message_then_the_fields() {
        let collect = |f: &dyn Fn()| {
            // A subscriber of the test's own, which keeps the formatted body.
            use std::sync::{Arc, Mutex};
            struct Keep(Arc<Mutex<Vec<String>>>);
            impl Subscriber for Keep {
                fn enabled(&self, _: &Metadata<'_>) -> bool {
                    true
                }
                fn new_span(&self, _: &Attributes<'_>) -> Id {
                    Id::from_u64(1)
                }
                fn record(&self, _: &Id, _: &Record<'_>) {}
                fn record_follows_from(&self, _: &Id, _: &Id) {}
                fn event(&self, event: &Event<'_>) {
                    let mut line = Line::default();
                    event.record(&mut line);
                    self.0.lock().unwrap().push(line.finish());
                }
                fn enter(&self, _: &Id) {}
                fn exit(&self, _: &Id) {}
            }
            let kept = Arc::new(Mutex::new(Vec::new()));
            tracing::subscriber::with_default(Keep(Arc::clone(&kept)), f);
            let lines = kept.lock().unwrap().clone();
            lines
        };
        let lines = collect(&|| {
            tracing::warn!(slot = 3, disk = "/x.img", "attached");
            tracing::info!("plain");
            tracing::info!(count = 2);
        });
        assert_eq!(lines, ["attached slot=3 disk=/x.img", "plain", "count=2"]);
    }

    #[test]
    fn the_log_crate_filter_follows_the_tracing_one() {
        assert_eq!(log_level(LevelFilter::OFF), log::LevelFilter::Off);
        assert_eq!(log_level(LevelFilter::WARN), log::LevelFilter::Warn);
        assert_eq!(log_level(LevelFilter::TRACE), log::LevelFilter::Trace);
    }
}
