//! Aligned columns for people, and free text made safe for a terminal.
//!
//! Metadata, health output and error messages are written by peers (any
//! process holding a write token for a service). Printed raw, an escape
//! sequence in them could rewrite the operator's terminal, and a newline could
//! forge a table row; [`clean`] escapes control and bidirectional-override
//! characters instead, so every cell and every error is one honest line.

use std::io::{self, Write};

/// Spaces between columns.
const GAP: &str = "  ";

/// How a column lines its cells up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    Left,
    /// Numbers: their digits line up.
    Right,
}

/// A table: a header row, then rows, each column as wide as its widest cell.
pub struct Table {
    columns: Vec<(&'static str, Align)>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(columns: &[(&'static str, Align)]) -> Table {
        Table { columns: columns.to_vec(), rows: Vec::new() }
    }

    /// Adds a row; its cells are [`clean`]ed, and an empty cell shows as `-`
    /// (but for the last, a remark column, which stays blank).
    pub fn push(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.columns.len());
        let last = cells.len().saturating_sub(1);
        let cells = cells.iter().enumerate().map(|(i, c)| match c.is_empty() {
            true if i < last => "-".to_string(),
            _ => clean(c),
        });
        self.rows.push(cells.collect());
    }

    pub fn write(&self, out: &mut dyn Write) -> io::Result<()> {
        let mut widths: Vec<usize> = self.columns.iter().map(|(h, _)| width(h)).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(width(cell));
            }
        }
        let aligns: Vec<Align> = self.columns.iter().map(|(_, a)| *a).collect();
        let header: Vec<String> = self.columns.iter().map(|(h, _)| h.to_string()).collect();
        write_row(out, &header, &widths, &aligns)?;
        for row in &self.rows {
            write_row(out, row, &widths, &aligns)?;
        }
        Ok(())
    }
}

/// One line of cells padded to `widths`; no line ends in spaces.
pub fn write_row(
    out: &mut dyn Write,
    cells: &[String],
    widths: &[usize],
    aligns: &[Align],
) -> io::Result<()> {
    let mut line = String::new();
    let last = cells.len().saturating_sub(1);
    for (i, cell) in cells.iter().enumerate() {
        if i > 0 {
            line.push_str(GAP);
        }
        let pad = widths.get(i).copied().unwrap_or(0).saturating_sub(width(cell));
        let align = aligns.get(i).copied().unwrap_or(Align::Left);
        if align == Align::Right {
            line.extend(std::iter::repeat_n(' ', pad));
        }
        line.push_str(cell);
        if align == Align::Left && i < last {
            line.extend(std::iter::repeat_n(' ', pad));
        }
    }
    writeln!(out, "{}", line.trim_end())
}

/// Display width, counted in characters (names and addresses are ASCII; wide
/// characters in peer text may misalign their row, never break it).
fn width(s: &str) -> usize {
    s.chars().count()
}

/// `s` with control characters (newlines, tabs, escape sequences) and
/// bidirectional overrides escaped as `\n`, `\u{1b}`, ...
pub fn clean(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() || is_bidi_control(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// The characters that reorder text on screen (the "Trojan Source" set).
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `s` cut to at most `max` characters, the cut marked with `…`.
pub fn truncate(s: &str, max: usize) -> String {
    if width(s) <= max {
        return s.to_string();
    }
    let mut cut: String = s.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(t: &Table) -> String {
        let mut out = Vec::new();
        t.write(&mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn columns_line_up_numbers_right_and_no_line_ends_in_spaces() {
        let mut t = Table::new(&[
            ("SERVICE", Align::Left),
            ("INSTANCES", Align::Right),
            ("ZONE", Align::Left),
            ("NOTE", Align::Left),
        ]);
        t.push(vec!["users".into(), "12".into(), "a".into(), String::new()]);
        t.push(vec!["billing-api".into(), "3".into(), String::new(), "x".into()]);
        assert_eq!(
            render(&t),
            "SERVICE      INSTANCES  ZONE  NOTE\n\
             users               12  a\n\
             billing-api          3  -     x\n"
        );
    }

    #[test]
    fn peer_text_cannot_break_a_row_or_reach_the_terminal() {
        let mut t = Table::new(&[("ID", Align::Left), ("OUTPUT", Align::Left)]);
        t.push(vec!["u1".into(), "ok\nu2  forged\u{1b}[2J\u{202e}".into()]);
        let text = render(&t);
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(!text.contains('\u{1b}') && !text.contains('\u{202e}'));
        assert!(text.contains(r"ok\nu2  forged\u{1b}[2J\u{202e}"), "{text}");
        assert_eq!(truncate("abcdef", 4), "abc…");
        assert_eq!(truncate("abc", 4), "abc");
    }
}
