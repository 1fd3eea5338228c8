//! The launch protocol: how `drover-init rsh` (on the node that runs
//! `mpirun`) asks `drover-init launch-listen` (PID 1 of the job's container
//! on another node) to start a command there — what ssh and sshd would do
//! for Open MPI, without either in the image.
//!
//! ```text
//! server → client   DROVER-LAUNCH 1 NONCE\n
//! client → server   LAUNCH JOB ATTEMPT NODE_RANK MAC CMDLEN\n  COMMAND (CMDLEN bytes)
//! server → client   OK\n  |  DENY REASON\n (then close)
//! then frames both ways: TYPE (1 byte) · LENGTH (4 bytes, big-endian) · PAYLOAD
//! ```
//!
//! `NONCE` is 32 lowercase hex digits (16 random bytes), new for every
//! connection, so a recorded request cannot be replayed. `MAC` is the
//! lowercase hex HMAC-SHA256 of [`mac_message`] under the job's launch
//! secret: only a holder of the secret can start a process, and only in the
//! container of the job, attempt and node rank that the MAC covers. The
//! server checks in a fixed order — the request parses ([`Refusal::BadRequest`]),
//! job and attempt are its own ([`Refusal::WrongJob`]), the node rank is its
//! own ([`Refusal::WrongNode`]), the MAC is right ([`Refusal::BadSecret`]) —
//! so a misdirected launch is told where it went wrong before its secret is
//! judged.
//!
//! Frames from the client: [`STDIN`] data, [`STDIN_EOF`] (empty), [`SIGNAL`]
//! (a 4-byte big-endian signal number). From the server: [`STDOUT`] and
//! [`STDERR`] data, then [`EXIT`] (a 4-byte big-endian exit code as a shell
//! reports it, 128 + signal for a killed process), sent only once the
//! process's stdout and stderr are at their end and forwarded. A frame longer
//! than [`MAX_FRAME`] is a protocol error: the connection is closed.

use std::io::{self, BufRead, Read, Write};
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The TCP port listeners bind and clients connect to unless
/// [`ENV_PORT`] says otherwise.
pub const DEFAULT_PORT: u16 = 29450;
/// The port of the launch listener.
pub const ENV_PORT: &str = "DROVER_LAUNCH_PORT";
/// The address the listener binds (default `0.0.0.0`).
pub const ENV_BIND: &str = "DROVER_LAUNCH_BIND";
/// The file holding the job's launch secret (hex).
pub const ENV_SECRET_FILE: &str = "DROVER_LAUNCH_SECRET_FILE";
/// How long the client keeps trying to connect, in seconds.
pub const ENV_CONNECT_TIMEOUT: &str = "DROVER_LAUNCH_CONNECT_TIMEOUT";
/// The client's default for [`ENV_CONNECT_TIMEOUT`]: other nodes'
/// containers may still be pulling their image when `mpirun` starts.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(600);

/// The protocol version in the greeting.
pub const VERSION: u32 = 1;
/// The first word of the server's greeting.
const GREETING: &str = "DROVER-LAUNCH";
/// The first line of every MAC'd message: a MAC of this protocol can never
/// pass for one of another use of the same key.
const MAC_CONTEXT: &str = "drover-launch-v1";
/// The most bytes of the request line, its newline included.
pub const MAX_HEADER: usize = 512;
/// The most bytes of a command.
pub const MAX_COMMAND: usize = 1 << 20;
/// The most bytes of one frame's payload.
pub const MAX_FRAME: usize = 64 * 1024;
/// How long the server waits for a connection to finish its handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Client → server: data for the process's stdin.
pub const STDIN: u8 = 0x01;
/// Client → server: the process's stdin is at its end (empty payload).
pub const STDIN_EOF: u8 = 0x02;
/// Client → server: a signal for the process group (4-byte big-endian).
pub const SIGNAL: u8 = 0x03;
/// Server → client: output of the process's stdout.
pub const STDOUT: u8 = 0x11;
/// Server → client: output of the process's stderr.
pub const STDERR: u8 = 0x12;
/// Server → client: the exit code (4-byte big-endian); the last frame.
pub const EXIT: u8 = 0x13;

/// Why a server refused a launch; [`Refusal::as_str`] is the `REASON` of
/// its `DENY` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The request line or command does not parse.
    BadRequest,
    /// The job name or attempt is not the listener's.
    WrongJob,
    /// The node rank is not the listener's.
    WrongNode,
    /// The MAC is wrong: the client does not hold the job's secret.
    BadSecret,
}

impl Refusal {
    /// The reason as the protocol spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::BadRequest => "bad request",
            Refusal::WrongJob => "wrong job",
            Refusal::WrongNode => "wrong node",
            Refusal::BadSecret => "bad secret",
        }
    }
}

/// Who a listener is, or whom a client asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// `DROVER_JOB_NAME`.
    pub job: String,
    /// `DROVER_ATTEMPT`.
    pub attempt: String,
    /// `NODE_RANK`.
    pub node_rank: u32,
}

/// Whether `s` can be one word of a protocol line: printable ASCII without
/// spaces, so that the line splits back into the same words.
pub fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic())
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 0xf) as usize] as char);
    }
    out
}

/// The bytes of lowercase hex `text`; `None` for anything else (upper case
/// included: the protocol has one spelling of every value).
pub fn unhex(text: &str) -> Option<Vec<u8>> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let bytes = text.as_bytes();
    if !bytes.len().is_multiple_of(2) {
        return None;
    }
    bytes
        .chunks(2)
        .map(|p| Some(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
}

/// The HMAC key in a secret file's `text`: the trimmed hex string's ASCII
/// bytes (not the bytes it encodes, so that every tool that handles the
/// secret as text computes the same MAC).
pub fn parse_secret(text: &str) -> Result<Vec<u8>, &'static str> {
    let key = text.trim();
    if key.is_empty() {
        return Err("the secret file is empty");
    }
    if !key.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("the secret file does not hold a hex string");
    }
    Ok(key.as_bytes().to_vec())
}

/// HMAC-SHA256 of `data` under `key`.
pub fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; 32] {
    // HMAC takes keys of any length: new_from_slice cannot fail for it.
    let mut mac = match Hmac::<Sha256>::new_from_slice(key) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC accepts keys of every length"),
    };
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// What a launch request's MAC covers: the nonce of this connection, whom
/// the launch is for and the command.
pub fn mac_message(nonce: &str, who: &Identity, command: &[u8]) -> Vec<u8> {
    let mut msg = format!(
        "{MAC_CONTEXT}\n{nonce}\n{}\n{}\n{}\n",
        who.job, who.attempt, who.node_rank
    )
    .into_bytes();
    msg.extend_from_slice(command);
    msg
}

/// The lowercase hex MAC of a launch request.
pub fn launch_mac(key: &[u8], nonce: &str, who: &Identity, command: &[u8]) -> String {
    hex(&hmac_sha256(key, &mac_message(nonce, who, command)))
}

/// Equality of two byte strings in time that depends on their lengths only,
/// so that timing does not tell how much of a forged MAC was right.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // black_box keeps the optimiser from turning the fold into an early exit.
    std::hint::black_box(diff) == 0
}

/// The server's greeting line for `nonce`.
pub fn greeting(nonce: &str) -> String {
    format!("{GREETING} {VERSION} {nonce}\n")
}

/// The nonce of a greeting line (without its newline); `None` when it is
/// not a greeting of this protocol version.
pub fn parse_greeting(line: &[u8]) -> Option<String> {
    let line = std::str::from_utf8(line).ok()?;
    let mut words = line.split(' ');
    let (Some(GREETING), Some(version), Some(nonce), None) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        return None;
    };
    if version != VERSION.to_string() || nonce.len() != 32 || unhex(nonce).is_none() {
        return None;
    }
    Some(nonce.to_string())
}

/// A parsed request line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Whom the launch is for.
    pub who: Identity,
    /// The MAC, lowercase hex.
    pub mac: String,
    /// The length of the command that follows the line.
    pub command_len: usize,
}

impl Request {
    /// The request line, newline included.
    pub fn line(&self) -> String {
        format!(
            "LAUNCH {} {} {} {} {}\n",
            self.who.job, self.who.attempt, self.who.node_rank, self.mac, self.command_len
        )
    }

    /// Parses a request line (without its newline).
    pub fn parse(line: &[u8]) -> Result<Request, Refusal> {
        let line = std::str::from_utf8(line).map_err(|_| Refusal::BadRequest)?;
        let words: Vec<&str> = line.split(' ').collect();
        let ["LAUNCH", job, attempt, node_rank, mac, len] = words[..] else {
            return Err(Refusal::BadRequest);
        };
        let number = |s: &str| {
            // Plain decimal digits: no sign, no spaces, one spelling.
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            s.parse::<u64>().ok()
        };
        let node_rank = number(node_rank)
            .and_then(|n| u32::try_from(n).ok())
            .ok_or(Refusal::BadRequest)?;
        let command_len = number(len)
            .and_then(|n| usize::try_from(n).ok())
            .filter(|n| *n <= MAX_COMMAND)
            .ok_or(Refusal::BadRequest)?;
        if !is_token(job) || !is_token(attempt) || mac.len() != 64 || unhex(mac).is_none() {
            return Err(Refusal::BadRequest);
        }
        Ok(Request {
            who: Identity {
                job: job.to_string(),
                attempt: attempt.to_string(),
                node_rank,
            },
            mac: mac.to_string(),
            command_len,
        })
    }

    /// The server's judgement of this request with its `command`, for a
    /// listener that is `me` and holds `key`, on a connection greeted with
    /// `nonce`.
    pub fn check(
        &self,
        command: &[u8],
        me: &Identity,
        key: &[u8],
        nonce: &str,
    ) -> Result<(), Refusal> {
        // A command sh cannot be given (it is passed as one argument).
        if command.len() != self.command_len || command.contains(&0) {
            return Err(Refusal::BadRequest);
        }
        if self.who.job != me.job || self.who.attempt != me.attempt {
            return Err(Refusal::WrongJob);
        }
        if self.who.node_rank != me.node_rank {
            return Err(Refusal::WrongNode);
        }
        let expected = launch_mac(key, nonce, &self.who, command);
        if !constant_time_eq(expected.as_bytes(), self.mac.as_bytes()) {
            return Err(Refusal::BadSecret);
        }
        Ok(())
    }
}

/// The server's answer to a request line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// The process starts; frames follow.
    Ok,
    /// Refused, with the reason.
    Deny(String),
}

impl Reply {
    /// The reply line, newline included.
    pub fn line(&self) -> String {
        match self {
            Reply::Ok => "OK\n".to_string(),
            Reply::Deny(reason) => format!("DENY {reason}\n"),
        }
    }

    /// Parses a reply line (without its newline).
    pub fn parse(line: &[u8]) -> Option<Reply> {
        let line = std::str::from_utf8(line).ok()?;
        if line == "OK" {
            return Some(Reply::Ok);
        }
        line.strip_prefix("DENY ")
            .map(|reason| Reply::Deny(reason.to_string()))
    }
}

/// Reads one line of at most `max` bytes (its newline included) and returns
/// it without the newline. A longer line is an `InvalidData` error, an end
/// of stream before the newline an `UnexpectedEof` one.
pub fn read_line(r: &mut impl BufRead, max: usize) -> io::Result<Vec<u8>> {
    let mut line = Vec::new();
    r.take(max as u64).read_until(b'\n', &mut line)?;
    if line.last() != Some(&b'\n') {
        return Err(if line.len() >= max {
            io::Error::new(io::ErrorKind::InvalidData, "line too long")
        } else {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed before the end of a line",
            )
        });
    }
    line.pop();
    Ok(line)
}

/// Writes one frame in one write, so that frames of two writers sharing a
/// stream under a lock never interleave.
pub fn write_frame(w: &mut impl Write, kind: u8, payload: &[u8]) -> io::Result<()> {
    if payload.len() > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "frame too long",
        ));
    }
    let mut frame = Vec::with_capacity(5 + payload.len());
    frame.push(kind);
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(payload);
    w.write_all(&frame)
}

/// Reads the next frame into `payload` and returns its type; `None` when
/// the stream ends cleanly between frames. A frame longer than
/// [`MAX_FRAME`] or a stream cut inside a frame is an error.
pub fn read_frame(r: &mut impl Read, payload: &mut Vec<u8>) -> io::Result<Option<u8>> {
    let mut head = [0u8; 5];
    let mut got = 0;
    while got < head.len() {
        match r.read(&mut head[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "frame too long"));
    }
    payload.resize(len, 0);
    r.read_exact(payload)?;
    Ok(Some(head[0]))
}

/// The 4-byte big-endian number of a [`SIGNAL`] or [`EXIT`] frame.
pub fn frame_u32(payload: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(payload.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_sha256_meets_rfc_4231() {
        // Test case 1.
        assert_eq!(
            hex(&hmac_sha256(&[0x0b; 20], b"Hi There")),
            "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"
        );
        // Test case 2: a key shorter than the block.
        assert_eq!(
            hex(&hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Test case 6: a key longer than the block is hashed first.
        assert_eq!(
            hex(&hmac_sha256(
                &[0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First"
            )),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn hex_round_trips_and_has_one_spelling() {
        assert_eq!(hex(&[0x00, 0xab, 0xff]), "00abff");
        assert_eq!(unhex("00abff"), Some(vec![0x00, 0xab, 0xff]));
        assert_eq!(unhex(""), Some(vec![]));
        for bad in ["0", "AB", "0g", "+1", " 0"] {
            assert_eq!(unhex(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_secret_is_its_trimmed_hex_text() {
        assert_eq!(parse_secret("  00ff\n"), Ok(b"00ff".to_vec()));
        assert_eq!(parse_secret("ABcd"), Ok(b"ABcd".to_vec()));
        assert!(parse_secret(" \n").is_err());
        assert!(parse_secret("secret").is_err());
    }

    #[test]
    fn the_mac_message_is_fixed() {
        let who = Identity {
            job: "j".into(),
            attempt: "2".into(),
            node_rank: 3,
        };
        assert_eq!(
            mac_message("n", &who, b"orted -x"),
            b"drover-launch-v1\nn\nj\n2\n3\norted -x".to_vec()
        );
        let mac = launch_mac(b"k", "n", &who, b"c");
        assert_eq!(
            mac,
            hex(&hmac_sha256(b"k", b"drover-launch-v1\nn\nj\n2\n3\nc"))
        );
        assert_eq!(mac.len(), 64);
    }

    #[test]
    fn constant_time_eq_is_equality() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(constant_time_eq(b"", b""));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }

    #[test]
    fn greetings_round_trip() {
        let nonce = "0123456789abcdef0123456789abcdef";
        let line = greeting(nonce);
        assert_eq!(line, format!("DROVER-LAUNCH 1 {nonce}\n"));
        assert_eq!(
            parse_greeting(line.trim_end().as_bytes()),
            Some(nonce.into())
        );
        for bad in [
            "DROVER-LAUNCH 2 0123456789abcdef0123456789abcdef",
            "DROVER-LAUNCH 1 0123",
            "DROVER-LAUNCH 1 0123456789ABCDEF0123456789ABCDEF",
            "DROVER-LAUNCH 1 0123456789abcdef0123456789abcdef x",
            "SSH-2.0-OpenSSH_9.2",
        ] {
            assert_eq!(parse_greeting(bad.as_bytes()), None, "{bad}");
        }
    }

    fn me() -> Identity {
        Identity {
            job: "train".into(),
            attempt: "1".into(),
            node_rank: 2,
        }
    }

    const NONCE: &str = "00112233445566778899aabbccddeeff";

    fn request(who: Identity, key: &[u8], command: &[u8]) -> Request {
        Request {
            mac: launch_mac(key, NONCE, &who, command),
            who,
            command_len: command.len(),
        }
    }

    #[test]
    fn requests_round_trip() {
        let r = request(me(), b"k", b"echo hi");
        let line = r.line();
        assert!(line.starts_with("LAUNCH train 1 2 "));
        assert!(line.ends_with(" 7\n"));
        assert_eq!(Request::parse(line.trim_end().as_bytes()), Ok(r));
    }

    #[test]
    fn malformed_requests_are_bad_requests() {
        let mac = "a".repeat(64);
        for bad in [
            String::new(),
            format!("LAUNCH train 1 2 {mac}"),
            format!("LAUNCH train 1 2 {mac} 7 x"),
            format!("launch train 1 2 {mac} 7"),
            format!("LAUNCH train 1 -2 {mac} 7"),
            format!("LAUNCH train 1 4294967296 {mac} 7"),
            format!("LAUNCH train 1 2 {} 7", "A".repeat(64)),
            format!("LAUNCH train 1 2 {} 7", "a".repeat(63)),
            format!("LAUNCH train 1 2 {mac} {}", MAX_COMMAND + 1),
            format!("LAUNCH train 1 2 {mac} +7"),
            format!("LAUNCH  train 1 2 {mac} 7"),
            format!("LAUNCH tr\x01in 1 2 {mac} 7"),
        ] {
            assert_eq!(
                Request::parse(bad.as_bytes()),
                Err(Refusal::BadRequest),
                "{bad:?}"
            );
        }
        assert!(Request::parse(format!("LAUNCH t 1 2 {mac} {MAX_COMMAND}").as_bytes()).is_ok());
    }

    #[test]
    fn checks_go_job_then_node_then_secret() {
        let key = b"00ff";
        let cmd = b"orted";
        assert_eq!(
            request(me(), key, cmd).check(cmd, &me(), key, NONCE),
            Ok(())
        );

        let other_job = Identity {
            job: "other".into(),
            ..me()
        };
        let other_attempt = Identity {
            attempt: "2".into(),
            ..me()
        };
        let other_node = Identity {
            node_rank: 1,
            ..me()
        };
        // Wrong job beats wrong secret: the misdirection is what to fix.
        for who in [other_job, other_attempt] {
            let r = request(who, b"wrong", cmd);
            assert_eq!(r.check(cmd, &me(), key, NONCE), Err(Refusal::WrongJob));
        }
        let r = request(other_node, b"wrong", cmd);
        assert_eq!(r.check(cmd, &me(), key, NONCE), Err(Refusal::WrongNode));

        let r = request(me(), b"wrong", cmd);
        assert_eq!(r.check(cmd, &me(), key, NONCE), Err(Refusal::BadSecret));
        // The MAC binds the command and the nonce.
        let r = request(me(), key, cmd);
        assert_eq!(
            r.check(b"rm -rf", &me(), key, NONCE).err(),
            Some(Refusal::BadRequest)
        );
        let mut forged = request(me(), key, cmd);
        forged.command_len = 6;
        assert_eq!(
            forged.check(b"orted2", &me(), key, NONCE),
            Err(Refusal::BadSecret)
        );
        assert_eq!(
            r.check(cmd, &me(), key, "ffeeddccbbaa99887766554433221100"),
            Err(Refusal::BadSecret)
        );
        let nul = b"a\0b";
        let r = request(me(), key, nul);
        assert_eq!(r.check(nul, &me(), key, NONCE), Err(Refusal::BadRequest));
    }

    #[test]
    fn replies_round_trip() {
        for reply in [Reply::Ok, Reply::Deny("wrong node".into())] {
            let line = reply.line();
            assert_eq!(Reply::parse(line.trim_end().as_bytes()), Some(reply));
        }
        assert_eq!(Reply::parse(b"NO"), None);
    }

    #[test]
    fn lines_are_bounded() {
        let kind = |r: io::Result<Vec<u8>>| r.err().map(|e| e.kind());
        let mut r = &b"abc\ndef"[..];
        assert_eq!(read_line(&mut r, 10).ok(), Some(b"abc".to_vec()));
        // No newline before the end.
        assert_eq!(
            kind(read_line(&mut r, 10)),
            Some(io::ErrorKind::UnexpectedEof)
        );
        let mut long = &b"abcdef\n"[..];
        assert_eq!(
            kind(read_line(&mut long, 6)),
            Some(io::ErrorKind::InvalidData)
        );
        let mut exact = &b"abcde\n"[..];
        assert_eq!(read_line(&mut exact, 6).ok(), Some(b"abcde".to_vec()));
    }

    #[test]
    fn frames_round_trip_and_are_bounded() {
        let mut wire = Vec::new();
        write_frame(&mut wire, STDOUT, b"hello").expect("write to a vec");
        write_frame(&mut wire, STDIN_EOF, b"").expect("write to a vec");
        write_frame(&mut wire, EXIT, &7u32.to_be_bytes()).expect("write to a vec");
        assert_eq!(&wire[..5], &[STDOUT, 0, 0, 0, 5]);
        let mut r = &wire[..];
        let mut p = Vec::new();
        assert_eq!(read_frame(&mut r, &mut p).ok(), Some(Some(STDOUT)));
        assert_eq!(p, b"hello");
        assert_eq!(read_frame(&mut r, &mut p).ok(), Some(Some(STDIN_EOF)));
        assert!(p.is_empty());
        assert_eq!(read_frame(&mut r, &mut p).ok(), Some(Some(EXIT)));
        assert_eq!(frame_u32(&p), Some(7));
        assert_eq!(read_frame(&mut r, &mut p).ok(), Some(None));

        assert!(write_frame(&mut Vec::new(), STDOUT, &vec![0; MAX_FRAME + 1]).is_err());
        let mut big = vec![STDIN];
        big.extend_from_slice(&(MAX_FRAME as u32 + 1).to_be_bytes());
        big.extend_from_slice(&vec![0; MAX_FRAME + 1]);
        assert!(read_frame(&mut &big[..], &mut p).is_err());
        // Cut inside the header and inside the payload.
        assert!(read_frame(&mut &[STDOUT, 0, 0][..], &mut p).is_err());
        assert!(read_frame(&mut &[STDOUT, 0, 0, 0, 5, b'h'][..], &mut p).is_err());
        assert_eq!(frame_u32(&[0, 0, 1]), None);
    }
}
