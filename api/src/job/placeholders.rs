//! `${{inputs.x}}` and `${{outputs.y}}` in a command, and `$[[…]]` sections
//! kept only when every placeholder in them resolves (Azure ML's optional
//! inputs).

/// Replaces `${{kind.name}}` placeholders through `lookup`. An unknown
/// placeholder is an error naming it; inside `$[[ … ]]` it drops the section.
pub(super) fn substitute(
    text: &str,
    lookup: &dyn Fn(&str, &str) -> Option<String>,
) -> Result<String, String> {
    fn replace_all(
        text: &str,
        lookup: &dyn Fn(&str, &str) -> Option<String>,
    ) -> Result<String, String> {
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(start) = rest.find("${{") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 3..];
            let end = after
                .find("}}")
                .ok_or_else(|| "unterminated `${{` placeholder".to_string())?;
            let expr = after[..end].trim();
            let (kind, name) = expr.split_once('.').unwrap_or((expr, ""));
            match lookup(kind, name) {
                Some(v) => out.push_str(&v),
                None => {
                    return Err(match kind {
                        "inputs" | "outputs" => format!(
                            "`${{{{{expr}}}}}` refers to {kind}.{name}, which the job does not define"
                        ),
                        _ => format!(
                            "`${{{{{expr}}}}}` is not supported (use ${{{{inputs.NAME}}}} or ${{{{outputs.NAME}}}})"
                        ),
                    });
                }
            }
            rest = &after[end + 2..];
        }
        out.push_str(rest);
        Ok(out)
    }

    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("$[[") {
        out.push_str(&replace_all(&rest[..start], lookup)?);
        let after = &rest[start + 3..];
        let end = after
            .find("]]")
            .ok_or_else(|| "unterminated `$[[` optional section".to_string())?;
        // An optional section is kept only if every placeholder in it resolves.
        if let Ok(section) = replace_all(&after[..end], lookup) {
            out.push_str(&section);
        }
        rest = &after[end + 2..];
    }
    out.push_str(&replace_all(rest, lookup)?);
    Ok(out)
}
