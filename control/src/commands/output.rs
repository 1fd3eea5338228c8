//! Plain-text rendering for the CLI: aligned tables, relative times, sizes.

use drover_api::cluster::Timestamp;

/// Renders rows under headers, columns padded to their widest cell.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::new();
        for (i, cell) in cells.enumerate() {
            if i > 0 {
                text.push_str("  ");
            }
            let pad = widths.get(i).copied().unwrap_or(0);
            text.push_str(&format!("{cell:<pad$}"));
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&mut headers.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

/// `5s ago`, `3m ago`, `2h ago`, `4d ago` relative to `now`.
pub fn ago(t: Timestamp, now: Timestamp) -> String {
    let secs = now.as_millis().saturating_sub(t.as_millis()) / 1000;
    match secs {
        0..60 => format!("{secs}s ago"),
        60..3600 => format!("{}m ago", secs / 60),
        3600..86_400 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86_400),
    }
}

/// Sizes as people read them (`1.5 GiB`).
pub use drover_api::units::format_bytes as bytes;

/// `-` for nothing.
pub fn or_dash(v: Option<impl ToString>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align() {
        let t = table(
            &["NAME", "STATE"],
            &[
                vec!["a-long-name".into(), "idle".into()],
                vec!["b".into(), "running".into()],
            ],
        );
        assert_eq!(
            t,
            "NAME         STATE\na-long-name  idle\nb            running\n"
        );
    }

    #[test]
    fn sizes() {
        for (n, expect) in [
            (0, "0 B"),
            (1023, "1023 B"),
            (1536, "1.5 KiB"),
            (80 << 30, "80.0 GiB"),
            (2 << 40, "2.0 TiB"),
        ] {
            assert_eq!(bytes(n), expect);
        }
    }

    #[test]
    fn relative_times() {
        let now = Timestamp::from_secs(100_000);
        for (secs, expect) in [
            (0, "0s ago"),
            (59, "59s ago"),
            (60, "1m ago"),
            (7200, "2h ago"),
            (90_000, "1d ago"),
        ] {
            assert_eq!(ago(Timestamp::from_secs(100_000 - secs), now), expect);
        }
        // A clock skewed ahead of us reads as now.
        assert_eq!(ago(Timestamp::from_secs(100_010), now), "0s ago");
    }
}
