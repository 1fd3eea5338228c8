//! The progress of a parallel job, as Drover's parallel runtime reports it:
//! one line in the job's log,
//! `drover-parallel: progress DONE/TOTAL mini-batches (FAILED failed), ITEMS items`
//! (`runner/parallel/driver.py` writes it). The control plane reads the
//! newest such line of the current attempt into the job's record, so
//! `drover job show` and the metrics have it, and `--stream` draws it as a
//! bar. The line is the job's own output: it can only tell about its job.

use std::fmt;

use serde::{Deserialize, Serialize};

/// What every progress line starts with.
const PROGRESS_PREFIX: &str = "drover-parallel: progress ";

/// Mini-batches of one attempt of a parallel job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParallelProgress {
    /// The attempt that reported it.
    pub attempt: u32,
    /// Mini-batches finished, failed ones included.
    pub done: u64,
    /// Of those, mini-batches that failed after their retries.
    pub failed: u64,
    /// Mini-batches in all.
    pub total: u64,
    /// Items (files or rows) of the mini-batches that succeeded.
    pub items: u64,
}

impl ParallelProgress {
    /// Reads a progress line of `attempt`; `None` for any other line.
    pub fn parse_line(text: &str, attempt: u32) -> Option<ParallelProgress> {
        let rest = text.trim_end().strip_prefix(PROGRESS_PREFIX)?;
        let (done, rest) = rest.split_once('/')?;
        let (total, rest) = rest.split_once(" mini-batches (")?;
        let (failed, rest) = rest.split_once(" failed), ")?;
        let items = rest.strip_suffix(" items")?;
        let progress = ParallelProgress {
            attempt,
            done: done.parse().ok()?,
            failed: failed.parse().ok()?,
            total: total.parse().ok()?,
            items: items.parse().ok()?,
        };
        (progress.done <= progress.total && progress.failed <= progress.done).then_some(progress)
    }

    /// Mini-batches (succeeded, failed) finished since `before`, an earlier
    /// report; a report of another attempt counts as nothing (a new
    /// attempt starts again from nothing).
    pub fn finished_since(&self, before: Option<&ParallelProgress>) -> (u64, u64) {
        let (done, failed) = before
            .filter(|b| b.attempt == self.attempt)
            .map_or((0, 0), |b| (b.done, b.failed));
        let succeeded = |done: u64, failed: u64| done.saturating_sub(failed);
        (
            succeeded(self.done, self.failed).saturating_sub(succeeded(done, failed)),
            self.failed.saturating_sub(failed),
        )
    }

    /// A bar of `width` cells, `#` for each share done: `[####------]`.
    pub fn bar(&self, width: usize) -> String {
        // done <= total, so this is at most `width`; nothing to do is done.
        let filled = self
            .done
            .saturating_mul(width as u64)
            .checked_div(self.total)
            .map_or(width, |f| usize::try_from(f).unwrap_or(width).min(width));
        format!("[{}{}]", "#".repeat(filled), "-".repeat(width - filled))
    }
}

impl fmt::Display for ParallelProgress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{} mini-batches ({} failed), {} items",
            self.done, self.total, self.failed, self.items
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_runtimes_progress_line_is_read_and_other_lines_are_not() {
        let p = ParallelProgress::parse_line(
            "drover-parallel: progress 12/20 mini-batches (1 failed), 55 items\n",
            2,
        );
        assert_eq!(
            p,
            Some(ParallelProgress {
                attempt: 2,
                done: 12,
                failed: 1,
                total: 20,
                items: 55
            })
        );
        let p = p.expect("parsed");
        assert_eq!(p.to_string(), "12/20 mini-batches (1 failed), 55 items");
        assert_eq!(p.bar(10), "[######----]");
        for other in [
            "hello",
            "drover-parallel: worker 1 died (signal 9)",
            "drover-parallel: progress 21/20 mini-batches (1 failed), 55 items",
            "drover-parallel: progress 2/20 mini-batches (3 failed), 55 items",
            "drover-parallel: progress x/20 mini-batches (1 failed), 55 items",
            "drover-parallel: progress 2/20 mini-batches (1 failed), 55 items and more",
        ] {
            assert_eq!(ParallelProgress::parse_line(other, 1), None, "{other}");
        }
    }

    #[test]
    fn what_finished_since_a_report_of_the_same_attempt_is_counted() {
        let p = |attempt, done, failed| ParallelProgress {
            attempt,
            done,
            failed,
            total: 10,
            items: 0,
        };
        assert_eq!(p(1, 6, 2).finished_since(None), (4, 2));
        assert_eq!(p(1, 6, 2).finished_since(Some(&p(1, 3, 1))), (2, 1));
        assert_eq!(p(2, 1, 0).finished_since(Some(&p(1, 9, 1))), (1, 0));
    }

    #[test]
    fn bars_are_full_at_the_end_and_for_nothing_to_do() {
        let p = |done, total| ParallelProgress {
            attempt: 1,
            done,
            failed: 0,
            total,
            items: 0,
        };
        assert_eq!(p(0, 3).bar(4), "[----]");
        assert_eq!(p(3, 3).bar(4), "[####]");
        assert_eq!(p(0, 0).bar(4), "[####]");
    }
}
