//! When the scheduled re-pack runs (`--repack-schedule`): a standard five-field cron
//! expression (minute, hour, day of month, month, day of week), optionally preceded by
//! `TZ=Zone` (an IANA name: `TZ=Europe/Amsterdam 0 3 * * 1-5`). Without a zone the hours are
//! UTC: hosts of a fleet agree on it, and the simulator's figures do not depend on the
//! machine's local zone.
//!
//! The cron syntax is `croner`'s (vixie-cron compatible: day of month and day of week are ORed,
//! `L`, `W`, `#` accepted), the zones `chrono-tz`'s. Time comes in as Unix seconds from the
//! `Host` clock (`epoch_s`), so the simulator's virtual time drives the schedule too.

use std::str::FromStr as _;

use chrono::{DateTime, TimeZone as _};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};

/// Why a `--repack-schedule` value cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    /// The `TZ=` prefix names no zone `chrono-tz` knows.
    #[error("unknown time zone {0:?} (use an IANA name such as Europe/Amsterdam)")]
    UnknownZone(String),
    /// Not five valid cron fields.
    #[error("{expr:?} is not a cron expression of five fields (minute hour day-of-month month day-of-week)")]
    Cron {
        expr: String,
        #[source]
        source: croner::errors::CronError,
    },
    /// Valid fields that no date matches (`0 0 30 2 *`).
    #[error("{0:?} matches no time (a date that does not exist?)")]
    Never(String),
}

/// A parsed `--repack-schedule`.
#[derive(Clone)]
pub struct Schedule {
    /// As given, for logs and the settings diff.
    text: String,
    zone: Tz,
    cron: Cron,
}

impl PartialEq for Schedule {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl std::fmt::Debug for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.text)
    }
}

impl std::fmt::Display for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl Schedule {
    /// Parses `[TZ=Zone] m h dom mon dow`.
    pub fn parse(s: &str) -> Result<Schedule, ScheduleError> {
        let text = s.trim();
        let (zone, expr) = match text.strip_prefix("TZ=") {
            Some(rest) => {
                let (name, expr) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
                (Tz::from_str(name).map_err(|_| ScheduleError::UnknownZone(name.to_string()))?, expr.trim())
            }
            None => (Tz::UTC, text),
        };
        let parser = CronParser::builder().seconds(Seconds::Disallowed).year(Year::Disallowed).build();
        let cron = parser.parse(expr).map_err(|source| ScheduleError::Cron { expr: expr.to_string(), source })?;
        let sched = Schedule { text: text.to_string(), zone, cron };
        // A pattern of valid fields may still match no date at all: say so now, not never.
        if sched.next_after(946_684_800).is_none() {
            return Err(ScheduleError::Never(expr.to_string()));
        }
        Ok(sched)
    }

    /// The first scheduled time strictly after `epoch_s` (Unix seconds), or `None` when there is
    /// none within croner's search limit.
    pub fn next_after(&self, epoch_s: u64) -> Option<u64> {
        let at: DateTime<Tz> = self.zone.timestamp_opt(i64::try_from(epoch_s).ok()?, 0).single()?;
        let next = self.cron.find_next_occurrence(&at, false).ok()?;
        u64::try_from(next.timestamp()).ok()
    }

    /// `epoch_s` as the schedule's zone reads it, for logs: `2026-03-02 03:00 CET`.
    pub fn local_time(&self, epoch_s: u64) -> String {
        i64::try_from(epoch_s)
            .ok()
            .and_then(|s| self.zone.timestamp_opt(s, 0).single())
            .map_or_else(|| format!("@{epoch_s}"), |t| t.format("%Y-%m-%d %H:%M %Z").to_string())
    }
}

/// When the schedule is due, between quanta: the next time it fires is computed from the first
/// quantum's clock (a time missed while the agent was down does not fire at start), and again
/// after each firing.
#[derive(Debug, Default)]
pub struct Timer {
    next_s: Option<u64>,
}

impl Timer {
    /// True once per scheduled time, at the first quantum at or after it.
    pub fn due(&mut self, schedule: &Schedule, now_s: u64) -> bool {
        match self.next_s {
            None => {
                self.next_s = schedule.next_after(now_s);
                false
            }
            Some(t) if now_s >= t => {
                self.next_s = schedule.next_after(now_s);
                true
            }
            Some(_) => false,
        }
    }

    /// Forgets the next time (a new schedule): computed again at the next quantum.
    pub fn reset(&mut self) {
        self.next_s = None;
    }

    /// The next scheduled time, once known.
    pub fn next_s(&self) -> Option<u64> {
        self.next_s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2024-01-15 (a Monday) 00:00:00 UTC.
    const MON: u64 = 1_705_276_800;

    #[test]
    fn utc_by_default_and_a_zone_moves_the_hours() {
        let s = Schedule::parse("0 3 * * *").unwrap();
        assert_eq!(s.next_after(MON), Some(MON + 3 * 3600));
        assert_eq!(s.next_after(MON + 3 * 3600), Some(MON + 27 * 3600), "strictly after");
        // Amsterdam is UTC+1 in January: 03:00 there is 02:00 UTC.
        let a = Schedule::parse("TZ=Europe/Amsterdam 0 3 * * *").unwrap();
        assert_eq!(a.next_after(MON), Some(MON + 2 * 3600));
        assert!(a.local_time(MON + 2 * 3600).starts_with("2024-01-15 03:00"), "{}", a.local_time(MON + 2 * 3600));
        // In July it is UTC+2.
        let july = 1_720_396_800; // 2024-07-08 00:00 UTC, a Monday
        assert_eq!(a.next_after(july), Some(july + 3600));
    }

    #[test]
    fn weekdays_only() {
        let s = Schedule::parse("TZ=UTC 0 3 * * 1-5").unwrap();
        // From Friday 04:00: the next is Monday 03:00, not Saturday.
        let fri = MON + 4 * 86_400 + 4 * 3600;
        assert_eq!(s.next_after(fri), Some(MON + 7 * 86_400 + 3 * 3600));
    }

    #[test]
    fn bad_expressions_are_typed_errors() {
        assert!(matches!(Schedule::parse("0 3 * *"), Err(ScheduleError::Cron { .. })));
        assert!(matches!(Schedule::parse("61 3 * * *"), Err(ScheduleError::Cron { .. })));
        assert!(matches!(Schedule::parse("0 0 3 * * *"), Err(ScheduleError::Cron { .. })), "no seconds field");
        assert!(matches!(Schedule::parse("daily"), Err(ScheduleError::Cron { .. })));
        assert!(
            matches!(Schedule::parse("TZ=Mars/Olympus 0 3 * * *"), Err(ScheduleError::UnknownZone(z)) if z == "Mars/Olympus")
        );
        assert!(matches!(Schedule::parse("0 0 30 2 *"), Err(ScheduleError::Never(_))));
    }

    #[test]
    fn the_timer_fires_once_per_time_and_not_for_a_time_missed_before_start() {
        let s = Schedule::parse("0 3 * * *").unwrap();
        let mut t = Timer::default();
        // Started at 05:00: 03:00 of that day was before the start.
        let start = MON + 5 * 3600;
        assert!(!t.due(&s, start));
        assert!(!t.due(&s, start + 3600));
        let fire = MON + 27 * 3600;
        assert!(!t.due(&s, fire - 1));
        assert!(t.due(&s, fire + 1), "at the first quantum at or after the time");
        assert!(!t.due(&s, fire + 3), "once");
        assert_eq!(t.next_s(), Some(fire + 86_400));
    }
}
