//! The dates in scheduled events.
//!
//! Azure documents `NotBefore` in RFC 1123 (`Mon, 19 Sep 2016 18:29:47 GMT`),
//! while Microsoft's own scheduled-events mock server
//! (`Azure-Samples/scheduled-events-mock-server`) sends ISO 8601 / RFC 3339
//! (`2026-12-01T20:04:21Z`). Both are read here, without a date library: a
//! misread date would stop jobs at the wrong time, so the two grammars are
//! spelled out and tested rather than guessed by a lenient parser.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A date that is neither RFC 1123 nor RFC 3339.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text:?} is neither an rfc 1123 nor an rfc 3339 date")]
pub struct InvalidDate {
    /// The text as IMDS sent it.
    pub text: String,
}

/// Reads an RFC 1123 date (`Mon, 19 Sep 2016 18:29:47 GMT`; the weekday is
/// optional and not checked, as it carries nothing the date does not) or an
/// RFC 3339 / ISO 8601 date-time (`2016-09-19T18:29:47Z`, with `t` or a
/// space for `T`, optional fractions, `Z` or a `±hh:mm`, `±hhmm` or `±hh`
/// offset; no offset means UTC, the only zone IMDS speaks).
pub fn parse_event_time(text: &str) -> Result<SystemTime, InvalidDate> {
    let trimmed = text.trim();
    let parsed = if trimmed.as_bytes().first().is_some_and(u8::is_ascii_digit)
        && trimmed.as_bytes().get(4) == Some(&b'-')
    {
        rfc3339(trimmed)
    } else {
        rfc1123(trimmed)
    };
    parsed.ok_or_else(|| InvalidDate {
        text: text.to_owned(),
    })
}

/// A civil UTC date and time, checked.
struct Civil {
    year: i64,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
    nanos: u32,
    /// Seconds east of UTC.
    offset: i64,
}

impl Civil {
    fn to_system_time(&self) -> Option<SystemTime> {
        let valid = (1..=12).contains(&self.month)
            && self.day >= 1
            && self.day <= days_in_month(self.year, self.month)
            && self.hour < 24
            && self.minute < 60
            // 60: a leap second, which RFC 3339 allows.
            && self.second <= 60
            && self.offset.abs() < 24 * 3600;
        if !valid {
            return None;
        }
        let days = days_from_civil(self.year, self.month, self.day);
        let secs = days * 86_400
            + i64::from(self.hour) * 3600
            + i64::from(self.minute) * 60
            + i64::from(self.second)
            - self.offset;
        let whole = Duration::from_secs(secs.unsigned_abs());
        let at = if secs >= 0 {
            UNIX_EPOCH.checked_add(whole)?
        } else {
            UNIX_EPOCH.checked_sub(whole)?
        };
        at.checked_add(Duration::from_nanos(u64::from(self.nanos)))
    }
}

fn is_leap(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days from 1970-01-01 to the given proleptic Gregorian date (Howard
/// Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Exactly `n` ASCII digits.
fn digits(s: &str, n: usize) -> Option<u32> {
    if s.len() != n || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// `HH:MM:SS`.
fn clock(s: &str) -> Option<(u32, u32, u32)> {
    let mut it = s.split(':');
    let h = digits(it.next()?, 2)?;
    let m = digits(it.next()?, 2)?;
    let sec = digits(it.next()?, 2)?;
    it.next().is_none().then_some((h, m, sec))
}

/// `±hh:mm`, `±hhmm` or `±hh` as seconds east of UTC.
fn numeric_offset(s: &str) -> Option<i64> {
    let sign = match s.as_bytes().first()? {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let rest = &s[1..];
    let (h, m) = match rest.len() {
        2 => (digits(rest, 2)?, 0),
        4 => (digits(&rest[..2], 2)?, digits(&rest[2..], 2)?),
        5 if rest.as_bytes()[2] == b':' => (digits(&rest[..2], 2)?, digits(&rest[3..], 2)?),
        _ => return None,
    };
    if m >= 60 {
        return None;
    }
    Some(sign * (i64::from(h) * 3600 + i64::from(m) * 60))
}

fn rfc3339(s: &str) -> Option<SystemTime> {
    // YYYY-MM-DD
    let (date, rest) = (s.get(..10)?, s.get(10..)?);
    let year = digits(date.get(..4)?, 4)?;
    let month = digits(date.get(5..7)?, 2)?;
    let day = digits(date.get(8..10)?, 2)?;
    if date.as_bytes()[4] != b'-' || date.as_bytes()[7] != b'-' {
        return None;
    }
    let rest = rest
        .strip_prefix(['T', 't', ' '])
        .filter(|r| r.len() >= 8)?;
    let (hour, minute, second) = clock(rest.get(..8)?)?;
    let mut rest = rest.get(8..)?;
    let mut nanos = 0;
    if let Some(frac) = rest.strip_prefix(['.', ',']) {
        let n = frac.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 {
            return None;
        }
        // Nanoseconds: the first nine digits; finer ones cannot matter.
        let kept = &frac[..n.min(9)];
        nanos = kept.parse::<u32>().ok()? * 10u32.pow(9 - u32::try_from(kept.len()).ok()?);
        rest = &frac[n..];
    }
    let offset = match rest {
        "" | "Z" | "z" => 0,
        other => numeric_offset(other)?,
    };
    Civil {
        year: i64::from(year),
        month,
        day,
        hour,
        minute,
        second,
        nanos,
        offset,
    }
    .to_system_time()
}

const MONTHS: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];

const WEEKDAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

fn rfc1123(s: &str) -> Option<SystemTime> {
    // An optional `Mon,` first.
    let s = match s.split_once(',') {
        Some((day, rest)) if WEEKDAYS.contains(&day.trim().to_ascii_lowercase().as_str()) => rest,
        Some(_) => return None,
        None => s,
    };
    let mut it = s.split_ascii_whitespace();
    let day_text = it.next()?;
    if day_text.is_empty() || day_text.len() > 2 {
        return None;
    }
    let day = digits(day_text, day_text.len())?;
    let month_text = it.next()?.to_ascii_lowercase();
    let month = MONTHS.iter().position(|m| *m == month_text)?;
    let year = digits(it.next()?, 4)?;
    let (hour, minute, second) = clock(it.next()?)?;
    let offset = match it.next()? {
        "GMT" | "UTC" | "UT" | "Z" => 0,
        other => numeric_offset(other).filter(|_| other.len() == 5)?,
    };
    if it.next().is_some() {
        return None;
    }
    Civil {
        year: i64::from(year),
        month: u32::try_from(month).ok()? + 1,
        day,
        hour,
        minute,
        second,
        nanos: 0,
        offset,
    }
    .to_system_time()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unix(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn the_forms_azure_and_its_mock_send() {
        let cases: &[(&str, SystemTime)] = &[
            // Azure's documentation (RFC 1123).
            ("Mon, 19 Sep 2016 18:29:47 GMT", unix(1_474_309_787)),
            ("Mon, 11 Apr 2022 22:26:58 GMT", unix(1_649_716_018)),
            // Microsoft's mock server (`%Y-%m-%dT%H:%M:%SZ`).
            ("2026-12-01T20:04:21Z", unix(1_796_155_461)),
            ("2016-09-19T18:29:47Z", unix(1_474_309_787)),
            // Other RFC 3339 spellings of the same instant.
            ("2016-09-19t18:29:47z", unix(1_474_309_787)),
            ("2016-09-19 18:29:47Z", unix(1_474_309_787)),
            ("2016-09-19T18:29:47", unix(1_474_309_787)),
            ("2016-09-19T20:29:47+02:00", unix(1_474_309_787)),
            ("2016-09-19T13:29:47-0500", unix(1_474_309_787)),
            ("2016-09-19T19:29:47+01", unix(1_474_309_787)),
            (
                "2016-09-19T18:29:47.250Z",
                unix(1_474_309_787) + Duration::from_millis(250),
            ),
            (
                "2016-09-19T18:29:47.1234567891Z",
                unix(1_474_309_787) + Duration::from_nanos(123_456_789),
            ),
            // RFC 1123 without the weekday, a one-digit day, a wrong weekday
            // (it is not checked), a numeric zone, surrounding space.
            ("19 Sep 2016 18:29:47 GMT", unix(1_474_309_787)),
            ("Thu, 1 Jan 1970 00:00:00 GMT", unix(0)),
            ("Fri, 19 Sep 2016 18:29:47 GMT", unix(1_474_309_787)),
            ("Mon, 19 Sep 2016 20:29:47 +0200", unix(1_474_309_787)),
            ("  Mon, 19 sep 2016 18:29:47 UTC ", unix(1_474_309_787)),
            // Leap years.
            ("2024-02-29T00:00:00Z", unix(1_709_164_800)),
            ("Tue, 29 Feb 2000 12:00:00 GMT", unix(951_825_600)),
        ];
        for (text, want) in cases {
            assert_eq!(parse_event_time(text).as_ref(), Ok(want), "{text}");
        }
    }

    #[test]
    fn anything_else_is_an_error_never_a_guess() {
        for text in [
            "",
            "now",
            "1474309787",
            "2016-09-19",
            "2016-09-19T18:29Z",
            "2016-13-01T00:00:00Z",
            "2023-02-29T00:00:00Z",
            "2016-09-31T00:00:00Z",
            "2016-09-19T24:00:00Z",
            "2016-09-19T18:29:47+25:00",
            "2016-09-19T18:29:47 GMT",
            "2016-09-19T18:29:47.Z",
            "2016/09/19 18:29:47",
            "Mon, 19 Sep 2016 18:29:47",
            "Mon, 19 Sep 2016 18:29:47 PST",
            "Mon, 19 Foo 2016 18:29:47 GMT",
            "Mon, 32 Sep 2016 18:29:47 GMT",
            "Someday, 19 Sep 2016 18:29:47 GMT",
            "Mon, 19 Sep 16 18:29:47 GMT",
            "Mon, 19 Sep 2016 18:29:47 GMT extra",
        ] {
            let err = parse_event_time(text).expect_err(text);
            assert_eq!(err.text, text);
        }
    }

    #[test]
    fn the_error_names_the_text() {
        let err = parse_event_time("soon").expect_err("not a date");
        assert_eq!(
            err.to_string(),
            "\"soon\" is neither an rfc 1123 nor an rfc 3339 date"
        );
    }

    #[test]
    fn days_from_civil_matches_known_dates() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(1969, 12, 31), -1);
        assert_eq!(days_from_civil(2026, 12, 1), 20_788);
    }
}
