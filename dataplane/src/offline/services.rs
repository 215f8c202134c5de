//! The recorders of a running data plane: one per service whose configuration has
//! `record`, started before the workers and finished after they have stopped. Both
//! modes (XDP and sockets) run their recordings through this, so a recording starts,
//! fails and ends the same way whichever data plane carries the sessions.

use anyhow::Context as _;

use super::recorder::{RecordHandle, Recorder, RecorderConfig};
use crate::config::ServiceConfig;

/// One entry per configured service, in configuration order: its recorder if it records.
#[derive(Default)]
pub struct ServiceRecorders {
    recorders: Vec<Option<(String, Recorder)>>,
}

impl ServiceRecorders {
    /// Starts a recorder for every service with `record`. One that cannot start
    /// (directory not creatable, file not writable) fails the whole start: running
    /// without the recording the operator asked for would lose exactly what it is there
    /// to keep. On error the recorders already started are dropped, which stops them.
    pub fn start(services: &[ServiceConfig]) -> anyhow::Result<Self> {
        let mut recorders = Vec::with_capacity(services.len());
        for service in services {
            let Some(spec) = &service.record else {
                recorders.push(None);
                continue;
            };
            let recorder = Recorder::start(RecorderConfig {
                dir: spec.dir.clone(),
                file_prefix: service.name.clone(),
                rotate_bytes: spec.rotate_bytes,
                rotate_secs: spec.rotate_secs,
                queue_capacity: spec.queue_capacity,
                record_responses: spec.responses,
            })
            .with_context(|| {
                format!(
                    "service {}: starting the recording in {}",
                    service.name,
                    spec.dir.display()
                )
            })?;
            tracing::info!(service = %service.name, dir = %spec.dir.display(), responses = spec.responses, "recording sessions");
            recorders.push(Some((service.name.clone(), recorder)));
        }
        Ok(Self { recorders })
    }

    /// Handles for the workers, one per service (`None`: the service does not record).
    pub fn handles(&self) -> Vec<Option<RecordHandle>> {
        self.recorders
            .iter()
            .map(|r| r.as_ref().map(|(_, recorder)| recorder.handle()))
            .collect()
    }

    /// Writes out everything queued and closes the files. Call it once the workers are
    /// gone: then nothing more is queued, and the sessions they reset at stop are in the
    /// files as aborted.
    pub fn finish(self) {
        for (name, recorder) in self.recorders.into_iter().flatten() {
            let r = recorder.finish();
            tracing::info!(service = %name, sessions = r.sessions_opened, detached = r.sessions_detached, refused = r.sessions_refused, bytes_written = r.bytes_written, files = r.files, write_errors = r.write_errors, "recording finished");
        }
    }
}
