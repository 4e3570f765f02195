//! Log lines for journald. When stderr is the journal (`$JOURNAL_STREAM` names it), a line has
//! no timestamp and no colours (journald records the time), starts with the syslog priority
//! prefix `<N>` (journald stores it as the entry's PRIORITY, so `journalctl -p warning` works),
//! and reads as `key=value` pairs, tracing's fields kept as they are:
//!
//! `<6>level=info target=hasync_agent::runtime msg=attached interface=in0 zone=trust mode=native`

use std::fmt;

use tracing::{
    field::{Field, Visit},
    Event, Level, Subscriber,
};
use tracing_subscriber::{
    fmt::{format::Writer, FmtContext, FormatEvent, FormatFields, FormattedFields},
    registry::LookupSpan,
};

/// The line a command that failed leaves on stderr: `error: ` and `message`; for the journal,
/// every line of it at priority err (`<3>`), so `journalctl -p err` shows why the agent
/// stopped (before stop 42 it was stored at the stream's default, info).
pub fn fatal_line(message: &str, journal: bool) -> String {
    let text = format!("error: {message}");
    if !journal {
        return text;
    }
    text.lines()
        .map(|line| format!("<3>{line}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Set by systemd to `DEVICE:INODE` of the stream connected to the journal.
pub const JOURNAL_STREAM: &str = "JOURNAL_STREAM";

/// Whether stderr is the journal: `$JOURNAL_STREAM` matches stderr's device and inode (a child
/// that inherited the variable but writes elsewhere does not count).
pub fn stderr_is_journal() -> bool {
    use std::os::fd::AsFd as _;
    std::env::var_os(JOURNAL_STREAM)
        .is_some_and(|value| stream_is(&value.to_string_lossy(), std::io::stderr().as_fd()))
}

/// Whether `fd` is the file `DEVICE:INODE` names.
fn stream_is(value: &str, fd: std::os::fd::BorrowedFd<'_>) -> bool {
    use std::os::fd::AsRawFd as _;
    let Some((dev, ino)) = value.split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    // SAFETY: fstat writes only the struct we own; a zeroed stat is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a valid fd and a valid out pointer.
    let rc = unsafe { libc::fstat(fd.as_raw_fd(), &mut st) };
    rc == 0 && st.st_dev == dev && st.st_ino == ino
}

/// The event format for journald (see the module docs).
#[derive(Clone, Copy, Debug, Default)]
pub struct JournalFormat;

/// The syslog priority of a level (sd-daemon(3)'s `<N>` prefixes).
pub fn priority(level: Level) -> u8 {
    match level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// `value` as a logfmt value: bare when it has no space, quote, `=` or control character,
/// else quoted with `\"`, `\\` and `\n` escaped.
pub fn logfmt_value(value: &str) -> String {
    let bare = !value.is_empty()
        && !value
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '"' | '=' | '\\'));
    if bare {
        return value.to_owned();
    }
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// An event's message and fields, in the order given.
#[derive(Default)]
struct Fields {
    message: Option<String>,
    fields: Vec<(&'static str, String)>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.push(field, value.to_owned());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        // `%x` fields and the message arrive here with Debug = Display.
        self.push(field, format!("{value:?}"));
    }
}

impl Fields {
    fn push(&mut self, field: &Field, value: String) {
        if field.name() == "message" {
            self.message = Some(value);
        } else {
            self.fields.push((field.name(), value));
        }
    }
}

impl<S, N> FormatEvent<S, N> for JournalFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let level = *meta.level();
        write!(
            writer,
            "<{}>level={} target={}",
            priority(level),
            level.as_str().to_ascii_lowercase(),
            meta.target()
        )?;
        let mut fields = Fields::default();
        event.record(&mut fields);
        if let Some(message) = &fields.message {
            write!(writer, " msg={}", logfmt_value(message))?;
        }
        for (name, value) in &fields.fields {
            write!(writer, " {name}={}", logfmt_value(value))?;
        }
        // Fields of the spans the event is in, outermost first, as the field formatter wrote them.
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let extensions = span.extensions();
                if let Some(f) = extensions.get::<FormattedFields<N>>() {
                    if !f.is_empty() {
                        write!(writer, " {f}")?;
                    }
                }
            }
        }
        writeln!(writer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log_capture::LogLines;

    #[test]
    fn a_fatal_error_is_an_error_in_the_journal_and_plain_elsewhere() {
        assert_eq!(fatal_line("bad config", false), "error: bad config");
        assert_eq!(
            fatal_line("bad config\nat line 3", true),
            "<3>error: bad config\n<3>at line 3"
        );
    }

    #[test]
    fn lines_carry_priority_level_target_message_and_fields() {
        let buf = LogLines::default();
        let out = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || out.clone())
            .with_ansi(false)
            .event_format(JournalFormat)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let mode = "native";
            tracing::info!(interface = "in0", %mode, count = 3_u32, "attached");
            tracing::warn!(peer = 2, error = %"link \"ha4\" down", "member no longer alive");
            tracing::error!("plain");
        });
        let text = buf.text();
        let lines: Vec<&str> = text.lines().collect();
        let target = module_path!();
        assert_eq!(
            lines,
            [
                format!(
                    "<6>level=info target={target} msg=attached interface=in0 mode=native count=3"
                ),
                format!(
                    "<4>level=warn target={target} msg=\"member no longer alive\" peer=2 \
                     error=\"link \\\"ha4\\\" down\""
                ),
                format!("<3>level=error target={target} msg=plain"),
            ]
        );
        assert!(!text.contains('\x1b'), "no colours: {text:?}");
    }

    #[test]
    fn values_are_quoted_only_when_needed() {
        for (value, want) in [
            ("in0", "in0"),
            ("198.18.100.1:7471", "198.18.100.1:7471"),
            ("", "\"\""),
            ("a b", "\"a b\""),
            ("k=v", "\"k=v\""),
            ("two\nlines", "\"two\\nlines\""),
            ("back\\slash", "\"back\\\\slash\""),
        ] {
            assert_eq!(logfmt_value(value), want, "{value:?}");
        }
    }

    #[test]
    fn the_journal_is_recognised_by_device_and_inode() {
        use std::os::{fd::AsFd as _, unix::fs::MetadataExt as _};
        let dir = crate::control::testing::TempDir::new("journal");
        let path = dir.path().join("journal");
        let file = std::fs::File::create(&path).expect("file");
        let meta = file.metadata().expect("stat");
        let fd = file.as_fd();
        assert!(stream_is(&format!("{}:{}", meta.dev(), meta.ino()), fd));
        for other in [
            format!("{}:{}", meta.dev(), meta.ino() + 1),
            format!("{}", meta.dev()),
            "x:y".to_owned(),
            String::new(),
        ] {
            assert!(!stream_is(&other, fd), "{other:?}");
        }
        std::fs::remove_file(&path).expect("cleanup");
    }
}
