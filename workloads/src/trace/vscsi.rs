//! CloudPhysics traces: binary vscsi v1 records (`vscsi`) and their CSV form
//! (`cloudphysics-csv`); both name operations by SCSI opcode.

use super::{dec, field_err, parse_u64, record, sectors, time_us, FieldError, Fields, Step, TraceOpKind};

/// Decodes one 32-byte vscsi v1 record (the reader reads it and counts it).
pub(super) fn parse_vscsi(rec: &[u8; 32]) -> Result<Step, FieldError> {
    let u16_at = |i: usize| u16::from_le_bytes([rec[i], rec[i + 1]]);
    let u32_at = |i: usize| u32::from_le_bytes(rec[i..i + 4].try_into().expect("4 bytes"));
    let u64_at = |i: usize| u64::from_le_bytes(rec[i..i + 8].try_into().expect("8 bytes"));
    let (len, cmd, ver, lbn, ts) = (u32_at(4), u16_at(12), u16_at(14), u64_at(16), u64_at(24));
    if ver != 0x0100 {
        let value = format!("{ver:#06x}");
        return Err(field_err("ver", &value, "unsupported version (expected 0x0100)"));
    }
    let Some(kind) = scsi_kind(u64::from(cmd)) else {
        return Ok(Step::Ignored);
    };
    let offset = lbn
        .checked_mul(512)
        .ok_or_else(|| field_err("lbn", &lbn.to_string(), "number too large"))?;
    Ok(record(ts, String::new(), kind, offset, u64::from(len)))
}

fn scsi_kind(opcode: u64) -> Option<TraceOpKind> {
    match opcode {
        0x08 | 0x28 | 0xa8 | 0x88 => Some(TraceOpKind::Read),
        0x0a | 0x2a | 0xaa | 0x8a => Some(TraceOpKind::Write),
        0x35 | 0x91 => Some(TraceOpKind::Flush),
        _ => None,
    }
}

pub(super) fn parse_cloudphysics_csv(line: &str) -> Result<Step, FieldError> {
    let f = Fields::csv(line);
    dec("version", f.get(0, "version")?)?;
    let time = time_us("time", f.get(1, "time")?, 6)?;
    let op = f.get(2, "op")?;
    let opcode = parse_u64("op", op.trim_start_matches("0x"), 16)?;
    let len = dec("size", f.get(3, "size")?)?;
    let offset = sectors("lbn", f.get(4, "lbn")?)?;
    Ok(match scsi_kind(opcode) {
        Some(kind) => record(time, String::new(), kind, offset, len),
        None => Step::Ignored,
    })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::super::testing::*;
    use super::super::{TraceFormat, TraceOpKind, TraceReader};
    use TraceOpKind::{Flush, Read as R, Write as W};

    fn vscsi_record(sn: u32, len: u32, cmd: u16, ver: u16, lbn: u64, ts: u64) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend(sn.to_le_bytes());
        v.extend(len.to_le_bytes());
        v.extend(1u32.to_le_bytes());
        v.extend(cmd.to_le_bytes());
        v.extend(ver.to_le_bytes());
        v.extend(lbn.to_le_bytes());
        v.extend(ts.to_le_bytes());
        v
    }

    #[test]
    fn vscsi() {
        let mut data = vscsi_record(1, 4096, 0x2a, 0x0100, 8, 100);
        data.extend(vscsi_record(2, 512, 0x28, 0x0100, 1, 200));
        data.extend(vscsi_record(3, 0, 0x12, 0x0100, 0, 250)); // INQUIRY: ignored
        data.extend(vscsi_record(4, 0, 0x35, 0x0100, 0, 260)); // SYNCHRONIZE CACHE
        data.extend(vscsi_record(5, 512, 0x2a, 0x0200, 1, 300)); // bad version
        data.extend(vscsi_record(6, 512, 0x8a, 0x0100, 2, 400));
        let f = temp(&data);
        let reader = TraceReader::open(f.path(), TraceFormat::Vscsi).unwrap();
        let (ok, err) = read_all(reader);
        assert_eq!(
            ok,
            vec![
                rec(100, "", W, 4096, 4096),
                rec(200, "", R, 512, 512),
                rec(260, "", Flush, 0, 0),
                rec(400, "", W, 1024, 512)
            ]
        );
        assert_eq!(err.len(), 1);
        assert!(err[0].ends_with(":5: field 'ver': unsupported version (expected 0x0100) in \"0x0200\""));

        data.extend(&vscsi_record(7, 512, 0x2a, 0x0100, 3, 500)[..20]);
        let f = temp(&data);
        let mut reader = TraceReader::open(f.path(), TraceFormat::Vscsi).unwrap().skip_bad(true);
        assert_eq!(reader.by_ref().count(), 4);
        assert_eq!((reader.skipped(), reader.ignored()), (2, 1));
        let (ok, err) = read_all(TraceReader::open(f.path(), TraceFormat::Vscsi).unwrap());
        assert_eq!(ok.len(), 4);
        assert!(
            err[1].ends_with(": record 7 is truncated: 20 of 32 bytes"),
            "{}",
            err[1]
        );
    }

    #[test]
    fn cloudphysics_csv() {
        let good = "version,time,op,size,lbn\r\n1,5633898,2a,512,42932745\r\n1,5633899,28,6656,40409911\r\n1,5633899,12,0,0\r\n";
        let (r, e) = parse(TraceFormat::CloudphysicsCsv, good);
        assert_eq!(e, None);
        assert_eq!(
            r,
            vec![
                rec(5_633_898_000_000, "", W, 42932745 * 512, 512),
                rec(5_633_899_000_000, "", R, 40409911 * 512, 6656)
            ]
        );
        let bad = format!("{good}1,5633899,zz,512,1\n");
        let e = parse(TraceFormat::CloudphysicsCsv, &bad).1.unwrap();
        assert!(e.ends_with(":5: field 'op': invalid digit in \"zz\""), "{e}");
        assert_eq!(parse_skipping(TraceFormat::CloudphysicsCsv, &bad).1, 1);
    }

    /// Validates both forms of the real CloudPhysics trace, when `shared/` is beside the
    /// repository (it is not part of the project: the test returns when it is absent).
    #[test]
    fn cloudphysics_trace_both_forms_agree() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/traces/cloudphysics");
        let (bin, csv) = (dir.join("cloudPhysicsIO.vscsi"), dir.join("cloudPhysicsIO.csv"));
        if !bin.exists() || !csv.exists() {
            eprintln!("skipped: {} not present", dir.display());
            return;
        }
        let mut bin = TraceReader::open(bin, TraceFormat::Vscsi).unwrap();
        let mut csv = TraceReader::open(csv, TraceFormat::CloudphysicsCsv).unwrap();
        let (mut n, mut writes) = (0u64, 0u64);
        loop {
            let (b, c) = match (bin.next(), csv.next()) {
                (None, None) => break,
                (Some(b), Some(c)) => (b.unwrap(), c.unwrap()),
                _ => panic!("the two forms differ in length after {n} records"),
            };
            // The CSV has whole seconds.
            assert_eq!((b.kind, b.offset, b.len), (c.kind, c.offset, c.len));
            assert_eq!(b.time_us / 1_000_000 * 1_000_000, c.time_us);
            n += 1;
            writes += u64::from(b.kind == W);
        }
        assert_eq!(n, 113_872);
        assert_eq!((bin.ignored(), csv.ignored()), (0, 0));
        let wf = writes as f64 / n as f64;
        assert!((wf - 0.587).abs() < 0.001, "{wf}");
    }
}
