//! Task placement: which executor the next task goes to.

use std::collections::BTreeMap;

use crate::cluster::executors::ExecutorInfo;

/// Least-loaded (most free slots) or, given a cursor, round-robin — avoiding `avoid` (where
/// the task's last attempt failed) when another executor has a free slot.
pub fn pick_executor(
    executors: &BTreeMap<String, ExecutorInfo>,
    avoid: Option<&str>,
    round_robin: Option<&mut usize>,
) -> Option<String> {
    let free: Vec<&ExecutorInfo> = executors.values().filter(|e| e.accepts_tasks()).collect();
    let preferred: Vec<&ExecutorInfo> = free
        .iter()
        .copied()
        .filter(|e| Some(e.id.as_str()) != avoid)
        .collect();
    let candidates = if preferred.is_empty() {
        free
    } else {
        preferred
    };
    match round_robin {
        Some(cursor) => {
            let chosen = candidates.get(*cursor % candidates.len().max(1))?;
            *cursor = cursor.wrapping_add(1);
            Some(chosen.id.clone())
        }
        None => candidates
            .into_iter()
            .max_by_key(|e| (e.free_slots, std::cmp::Reverse(e.id.clone())))
            .map(|e| e.id.clone()),
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::cluster::executors::Breaker;

    fn executors() -> BTreeMap<String, ExecutorInfo> {
        ["a", "b"]
            .iter()
            .enumerate()
            .map(|(port, id)| {
                let port = u16::try_from(port).unwrap() + 1;
                let info =
                    ExecutorInfo::new(id.to_string(), "127.0.0.1".into(), port, 2, String::new());
                (id.to_string(), info)
            })
            .collect()
    }

    #[test]
    fn least_loaded_round_robin_avoidance_draining_and_breakers() {
        let mut executors = executors();
        executors.get_mut("a").unwrap().free_slots = 1;
        assert_eq!(pick_executor(&executors, None, None).as_deref(), Some("b"));
        assert_eq!(
            pick_executor(&executors, Some("b"), None).as_deref(),
            Some("a"),
            "retry avoids b"
        );
        executors.get_mut("a").unwrap().free_slots = 0;
        assert_eq!(
            pick_executor(&executors, Some("b"), None).as_deref(),
            Some("b"),
            "b when nothing else"
        );
        executors.get_mut("a").unwrap().free_slots = 2;
        let mut cursor = 0;
        let picks: Vec<String> = (0..4)
            .filter_map(|_| pick_executor(&executors, None, Some(&mut cursor)))
            .collect();
        assert_eq!(picks, ["a", "b", "a", "b"]);
        executors.get_mut("a").unwrap().draining = true;
        assert_eq!(pick_executor(&executors, None, None).as_deref(), Some("b"));
        executors.get_mut("a").unwrap().draining = false;
        executors.get_mut("b").unwrap().breaker = Breaker::Open {
            until: Instant::now() + Duration::from_secs(60),
            probing: false,
        };
        for _ in 0..3 {
            assert_eq!(
                pick_executor(&executors, None, None).as_deref(),
                Some("a"),
                "no tasks go to an open breaker"
            );
        }
    }
}
