//! Tests read what the agent logs: a writer a test's tracing subscriber writes into, whose
//! text the test then reads.

use std::{
    io,
    sync::{Arc, Mutex},
};

use crate::lock::lock;

/// Everything written so far (clones share it).
#[derive(Clone, Default)]
pub struct LogLines(Arc<Mutex<Vec<u8>>>);

impl LogLines {
    /// What was written, as text (which must be UTF-8).
    pub fn text(&self) -> String {
        String::from_utf8(lock(&self.0).clone()).expect("log lines in UTF-8")
    }
}

impl io::Write for LogLines {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        lock(&self.0).extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
