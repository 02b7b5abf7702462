//! Alibaba block traces (`alibaba`): CSV `device_id,opcode,offset,length,timestamp`.

use super::{dec, field_err, record, FieldError, Fields, Step, TraceOpKind};

pub(super) fn parse_alibaba(line: &str) -> Result<Step, FieldError> {
    let f = Fields::csv(line);
    let device = f.get(0, "device_id")?;
    let op = f.get(1, "opcode")?;
    let kind = match op {
        "R" | "r" => TraceOpKind::Read,
        "W" | "w" => TraceOpKind::Write,
        _ => return Err(field_err("opcode", op, "expected R or W")),
    };
    let offset = dec("offset", f.get(2, "offset")?)?;
    let len = dec("length", f.get(3, "length")?)?;
    let time = dec("timestamp", f.get(4, "timestamp")?)?;
    Ok(record(time, device.to_string(), kind, offset, len))
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::super::{TraceFormat, TraceOpKind};
    use TraceOpKind::{Read as R, Write as W};

    #[test]
    fn alibaba() {
        let good = "device_id,opcode,offset,length,timestamp\n10,R,126764536832,4096,1577808000000126\n10,W,1024,8192,1577808000000204\n";
        let (r, e) = parse(TraceFormat::Alibaba, good);
        assert_eq!(e, None);
        assert_eq!(
            r,
            vec![
                rec(1577808000000126, "10", R, 126764536832, 4096),
                rec(1577808000000204, "10", W, 1024, 8192)
            ]
        );
        let e = parse(TraceFormat::Alibaba, &format!("{good}10,X,0,512,1\n")).1.unwrap();
        assert!(e.ends_with(":4: field 'opcode': expected R or W in \"X\""), "{e}");
    }
}
