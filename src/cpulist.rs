//! The kernel's cpu list format: `0-3,8,10-11`.

/// A malformed cpu list.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("Invalid cpu list {list:?}: {why}")]
pub struct CpuListError {
    pub list: String,
    pub why: &'static str,
}

/// Largest cpu id accepted (Linux's NR_CPUS upper bound).
pub const MAX_CPU: u32 = 8191;

/// Parses `0-3,8` into sorted, de-duplicated ids. An empty string is an empty list.
pub fn parse(s: &str) -> Result<Vec<u32>, CpuListError> {
    let err = |why| CpuListError { list: s.to_string(), why };
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (part, part),
        };
        let a: u32 = a.parse().map_err(|_| err("not a number"))?;
        let b: u32 = b.parse().map_err(|_| err("not a number"))?;
        if a > b {
            return Err(err("range runs backwards"));
        }
        if b > MAX_CPU {
            return Err(err("cpu id above 8191"));
        }
        out.extend(a..=b);
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// Formats sorted ids as ranges: `[0,1,2,3,8]` → `0-3,8`.
pub fn format(ids: &[u32]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < ids.len() {
        let start = ids[i];
        let mut end = start;
        while i + 1 < ids.len() && ids[i + 1] == end + 1 {
            i += 1;
            end = ids[i];
        }
        if !out.is_empty() {
            out.push(',');
        }
        if start == end {
            out.push_str(&start.to_string());
        } else {
            out.push_str(&format!("{start}-{end}"));
        }
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        assert_eq!(parse("0-3,8").unwrap(), vec![0, 1, 2, 3, 8]);
        assert_eq!(parse(" 2, 0-1 ,1").unwrap(), vec![0, 1, 2]);
        assert_eq!(parse("").unwrap(), Vec::<u32>::new());
        assert_eq!(format(&[0, 1, 2, 3, 8, 10, 11]), "0-3,8,10-11");
        assert_eq!(format(&[5]), "5");
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse("a").is_err());
        assert!(parse("3-1").is_err());
        assert!(parse("0-99999").is_err());
        assert!(parse("1-").is_err());
    }
}
