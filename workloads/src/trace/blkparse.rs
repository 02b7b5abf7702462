//! blkparse's default text output (`blkparse`): queue (`Q`) events only.

use super::{field_err, record, sectors, time_us, FieldError, Step, TraceOpKind};

/// Whether `s` is a blkparse device field, `major,minor`.
fn is_device(s: &str) -> bool {
    s.split_once(',').is_some_and(|(a, b)| {
        !a.is_empty() && !b.is_empty() && (a.bytes().chain(b.bytes())).all(|c| c.is_ascii_digit())
    })
}

pub(super) fn parse_blkparse(line: &str) -> Result<Step, FieldError> {
    let t: Vec<&str> = line.split_whitespace().collect();
    // Event lines start with the device; the summary blkparse prints at the end does not.
    if !t.first().is_some_and(|d| is_device(d)) {
        return Ok(Step::Nothing);
    }
    let get = |i: usize, field: &'static str| t.get(i).copied().ok_or_else(|| field_err(field, "", "missing"));
    let time = time_us("time", get(3, "time")?, 6)?;
    if get(5, "action")? != "Q" {
        return Ok(Step::Ignored);
    }
    let rwbs = get(6, "rwbs")?;
    let device = t[0].to_string();
    // A leading F is a preflush: alone (no range, or an empty one) it is a flush; with
    // data it is that write.
    let preflush = rwbs.starts_with('F');
    if preflush && t.get(7).is_none_or(|s| s.starts_with('[')) {
        return Ok(record(time, device, TraceOpKind::Flush, 0, 0));
    }
    let kind = if rwbs.contains('D') {
        TraceOpKind::Discard
    } else if rwbs.contains('W') {
        TraceOpKind::Write
    } else if rwbs.contains('R') {
        TraceOpKind::Read
    } else if preflush {
        TraceOpKind::Flush
    } else {
        return Ok(Step::Ignored);
    };
    let offset = sectors("sector", get(7, "sector")?)?;
    let plus = get(8, "+")?;
    if plus != "+" {
        return Err(field_err("+", plus, "expected '+'"));
    }
    let len = sectors("count", get(9, "count")?)?;
    let kind = if preflush && len == 0 { TraceOpKind::Flush } else { kind };
    Ok(record(time, device, kind, offset, len))
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::super::{TraceFormat, TraceOpKind};
    use TraceOpKind::{Discard, Flush, Read as R, Write as W};

    #[test]
    fn blkparse() {
        let good = "\
  8,0    3        1     0.000000000   697  Q  WS 223490 + 8 [kjournald]
  8,0    3        2     0.000001234   697  G  WS 223490 + 8 [kjournald]
  8,0    3        3     0.000002000   697  Q   R 100 + 16 [cat]
  8,16   0        1     1.500000000   800  Q  DS 2048 + 2048 [fstrim]
  8,0    1        4     2.000000000   697  Q FWS [jbd2/sda1-8]
  8,0    1        6     2.010000000   697  Q FWS 0 + 0 [jbd2/sda1-8]
  8,0    1        7     2.020000000   697  Q FWFS 4096 + 8 [jbd2/sda1-8]
  8,0    0        0     2.100000000     0  m   N cfq697 insert_request
  8,0    1        5     2.200000000   697  Q   N [kworker]

CPU0 (8,0):
 Reads Queued:           1,        8KiB\t Writes Queued:           1,        4KiB
Total (8,0):
Throughput (R/W): 0KiB/s / 0KiB/s
Events (8,0): 7 entries
Skips: 0 forward (0 -   0.0%)
";
        let (r, e) = parse(TraceFormat::Blkparse, good);
        assert_eq!(e, None);
        assert_eq!(
            r,
            vec![
                rec(0, "8,0", W, 223490 * 512, 4096),
                rec(2, "8,0", R, 51200, 8192),
                rec(1_500_000, "8,16", Discard, 1 << 20, 1 << 20),
                rec(2_000_000, "8,0", Flush, 0, 0),
                rec(2_010_000, "8,0", Flush, 0, 0),
                rec(2_020_000, "8,0", W, 4096 * 512, 4096)
            ]
        );
        let bad = good.replacen(
            "3        3     0.000002000   697  Q   R 100 +",
            "3        3     0.000002000   697  Q   R 1x0 +",
            1,
        );
        let e = parse(TraceFormat::Blkparse, &bad).1.unwrap();
        assert!(e.ends_with(":3: field 'sector': invalid digit in \"1x0\""), "{e}");
        let (r2, skipped) = parse_skipping(TraceFormat::Blkparse, &bad);
        assert_eq!((r2.len(), skipped), (5, 1));
    }
}
