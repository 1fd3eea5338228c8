//! The output protocol of `drover-init`: how the lines of a job's ranks
//! reach the container's output with the rank that wrote them, and how a
//! reader (the agent, `drover run`) recovers that rank.
//!
//! When a container runs more than one rank, drover-init gives each rank
//! its own stdout and stderr pipes and forwards every line to its own
//! stdout or stderr with a marker in front:
//!
//! ```text
//! <RS>rank 3<US>text of the line<LF>
//! ```
//!
//! where 3 is the rank's `RANK`. The marker opens with ASCII RS (0x1e) and
//! closes with ASCII US (0x1f), control characters that text output does
//! not contain, so a line of user output cannot pass for one by accident;
//! and since every forwarded line gets drover-init's own marker first, a
//! marker written by the user sits inside the text, where readers leave it.
//! A line longer than [`MAX_PIECE`] bytes is forwarded in pieces, each with
//! its own marker.
//!
//! The library uses nothing but `std` (and, for [`launch`], `sha2` and
//! `hmac`), so the agent and the CLI depend on the very definitions
//! drover-init writes and speaks by, at little cost.
//!
//! [`launch`] is the other protocol drover-init speaks: how `drover-init
//! rsh` asks the `drover-init launch-listen` of another node's container to
//! start a process (Open MPI's daemons) without SSH.

pub mod launch;

/// The first byte of a rank marker (ASCII record separator).
pub const MARK_START: u8 = 0x1e;
/// The last byte of a rank marker (ASCII unit separator).
pub const MARK_END: u8 = 0x1f;
/// What follows [`MARK_START`], before the rank's decimal number.
const TAG: &[u8] = b"rank ";

/// The most bytes of one line forwarded in one piece. Longer lines are cut
/// into pieces of at most this size (at a UTF-8 character boundary where
/// one is near), so that a piece with its marker stays below the container
/// engine's own 16 KiB split and the agent's line limit: nothing is cut
/// off, and every piece keeps its rank.
pub const MAX_PIECE: usize = 8 * 1024;

/// Appends `rank`'s marker to `out`.
pub fn write_marker(rank: u32, out: &mut Vec<u8>) {
    out.push(MARK_START);
    out.extend_from_slice(TAG);
    out.extend_from_slice(rank.to_string().as_bytes());
    out.push(MARK_END);
}

/// Splits a line into the rank its marker names and the text after it;
/// a line without a marker is all text.
pub fn split_marker(line: &str) -> (Option<u32>, &str) {
    match parse(line.as_bytes()) {
        // The marker is ASCII, so its end is a character boundary.
        Some((rank, len)) => (Some(rank), &line[len..]),
        None => (None, line),
    }
}

/// The rank of the marker at the start of `line` and the marker's length.
fn parse(line: &[u8]) -> Option<(u32, usize)> {
    let rest = line.strip_prefix(&[MARK_START])?.strip_prefix(TAG)?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    // At most u32::MAX's ten digits; no sign, no empty number.
    if digits == 0 || digits > 10 || rest.get(digits) != Some(&MARK_END) {
        return None;
    }
    let rank = std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()?;
    Some((rank, 1 + TAG.len() + digits + 1))
}

/// Cuts one rank's output stream into lines of at most [`MAX_PIECE`] bytes.
#[derive(Debug, Default)]
pub struct Lines {
    /// The start of a line whose end has not arrived yet.
    pending: Vec<u8>,
}

impl Lines {
    /// Takes the next bytes of the stream and hands `emit` every line they
    /// complete (without its newline), and every full piece of a line
    /// longer than [`MAX_PIECE`]. An empty line is a line.
    pub fn push(&mut self, mut data: &[u8], emit: &mut dyn FnMut(&[u8])) {
        while let Some(end) = data.iter().position(|b| *b == b'\n') {
            self.pending.extend_from_slice(&data[..end]);
            self.cut_pieces(emit);
            emit(&self.pending);
            self.pending.clear();
            data = &data[end + 1..];
        }
        self.pending.extend_from_slice(data);
        self.cut_pieces(emit);
    }

    /// Hands `emit` the last line when the stream ended without a newline.
    pub fn finish(&mut self, emit: &mut dyn FnMut(&[u8])) {
        if !self.pending.is_empty() {
            emit(&self.pending);
            self.pending.clear();
        }
    }

    /// Emits pieces while more than one piece is pending. Exactly one
    /// piece waits: its newline may be the next byte, and cutting it now
    /// would add an empty line.
    fn cut_pieces(&mut self, emit: &mut dyn FnMut(&[u8])) {
        let mut start = 0;
        while self.pending.len() - start > MAX_PIECE {
            let cut = char_boundary(&self.pending[start..], MAX_PIECE);
            emit(&self.pending[start..start + cut]);
            start += cut;
        }
        self.pending.drain(..start);
    }
}

/// The largest cut of `bytes` at or below `max` that does not split a UTF-8
/// character (`bytes[cut]` is not a continuation byte), looking back at most
/// three bytes; `max` for output that is not UTF-8 there.
fn char_boundary(bytes: &[u8], max: usize) -> usize {
    let is_continuation = |i: usize| bytes.get(i).is_some_and(|b| b & 0xc0 == 0x80);
    (max.saturating_sub(3).max(1)..=max)
        .rev()
        .find(|&cut| !is_continuation(cut))
        .unwrap_or(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marked(rank: u32, text: &str) -> String {
        let mut out = Vec::new();
        write_marker(rank, &mut out);
        out.extend_from_slice(text.as_bytes());
        String::from_utf8(out).expect("ascii marker")
    }

    #[test]
    fn a_marker_is_written_and_read_back() {
        for (rank, text) in [(0, "hello"), (3, ""), (u32::MAX, "a\x1erank 1\x1fb")] {
            let line = marked(rank, text);
            assert_eq!(split_marker(&line), (Some(rank), text), "{line:?}");
        }
        assert_eq!(marked(12, "x"), "\x1erank 12\x1fx");
    }

    #[test]
    fn only_a_whole_marker_at_the_start_counts() {
        for line in [
            "plain text",
            "",
            "\x1e",
            "\x1erank \x1fx",
            "\x1erank 3",
            "\x1erank 3x",
            "\x1erank -3\x1fx",
            "\x1erank +3\x1fx",
            "\x1eRANK 3\x1fx",
            "\x1erank 99999999999\x1fx",
            "\x1erank 4294967296\x1fx",
            " \x1erank 3\x1fx",
            "rank 3\x1fx",
        ] {
            assert_eq!(split_marker(line), (None, line), "{line:?}");
        }
        // A user's marker after ours is text.
        let line = marked(1, "\x1erank 7\x1fforged");
        assert_eq!(split_marker(&line), (Some(1), "\x1erank 7\x1fforged"));
    }

    fn lines_of(chunks: &[&[u8]]) -> Vec<Vec<u8>> {
        let mut lines = Lines::default();
        let mut out = Vec::new();
        for c in chunks {
            lines.push(c, &mut |l| out.push(l.to_vec()));
        }
        lines.finish(&mut |l| out.push(l.to_vec()));
        out
    }

    #[test]
    fn lines_are_cut_at_newlines_whatever_the_reads() {
        assert_eq!(
            lines_of(&[b"a\nb", b"c\n\n", b"d"]),
            vec![b"a".to_vec(), b"bc".to_vec(), b"".to_vec(), b"d".to_vec()]
        );
        assert_eq!(lines_of(&[b"x\n"]), vec![b"x".to_vec()]);
        assert!(lines_of(&[]).is_empty());
    }

    #[test]
    fn a_long_line_is_split_into_pieces_and_nothing_is_lost() {
        let long: Vec<u8> = (0..100_000u32).map(|i| b'a' + (i % 26) as u8).collect();
        let mut input = long.clone();
        input.extend_from_slice(b"\nafter\n");
        // Read in odd-sized chunks, as a pipe would deliver them.
        let chunks: Vec<&[u8]> = input.chunks(3_000).collect();
        let out = lines_of(&chunks);
        let pieces = &out[..out.len() - 1];
        assert_eq!(pieces.len(), 100_000usize.div_ceil(MAX_PIECE));
        assert!(pieces.iter().all(|p| p.len() <= MAX_PIECE));
        assert_eq!(pieces.concat(), long);
        assert_eq!(out.last().map(Vec::as_slice), Some(&b"after"[..]));
    }

    #[test]
    fn a_line_of_exactly_one_piece_stays_one_line() {
        let mut input = vec![b'x'; MAX_PIECE];
        input.push(b'\n');
        let (first, second) = input.split_at(MAX_PIECE);
        assert_eq!(lines_of(&[first, second]), vec![vec![b'x'; MAX_PIECE]]);
    }

    #[test]
    fn pieces_do_not_split_a_character() {
        // 'é' is two bytes: a piece boundary at an odd offset falls inside one.
        let text = "é".repeat(MAX_PIECE);
        let mut input = b"a".to_vec();
        input.extend_from_slice(text.as_bytes());
        let out = lines_of(&[&input]);
        assert!(out.len() > 1);
        for piece in &out {
            assert!(
                std::str::from_utf8(piece).is_ok(),
                "a piece split a character"
            );
        }
        assert_eq!(out.concat(), input);
    }
}
