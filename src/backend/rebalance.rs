//! Rebalancing (`rebalance:` on a pool): after a backend joins (a reload,
//! DNS discovery) or comes back healthy, new sessions go to it but the old
//! ones stay where they were, so load stays uneven for as long as they
//! live. Once a second this task compares the live sessions of the pool's
//! available backends and asks the most loaded to shed sessions towards the
//! mean, at most `max_moves_per_second` in all, until no backend holds more
//! than the mean times `1 + tolerance` (plus one). Sessions that can move
//! (`mode: frames` with `resume`) claim those requests and resume on the
//! least loaded backend; requests nobody claims lapse at the next tick.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::task::TaskTracker;
use tracing::{debug, info};

use crate::backend::pool::Pool;
use crate::config::Rebalance;
use crate::supervise::{Kind, Panics};

/// Starts the pool's rebalancer, if it has `rebalance:`, supervised; it ends with `pool.life`.
pub fn spawn(pool: &Arc<Pool>, tasks: &TaskTracker, panics: &Arc<Panics>) {
    let Some(cfg) = pool.rebalance else {
        return;
    };
    let p = pool.clone();
    crate::supervise::spawn(
        tasks,
        panics.clone(),
        Kind::Rebalance,
        format!("pool {}", pool.name),
        pool.life.clone(),
        move || run(p.clone(), cfg),
    );
}

async fn run(pool: Arc<Pool>, cfg: Rebalance) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut asking = false;
    loop {
        tick.tick().await;
        let members = pool.backends();
        let usable: Vec<_> = members
            .iter()
            .filter(|b| !b.drain && b.health.available())
            .collect();
        let loads: Vec<usize> = usable.iter().map(|b| b.active()).collect();
        let moves = plan(&loads, cfg.max_moves_per_second as usize, cfg.tolerance);
        let asked: usize = moves.iter().sum();
        // Logged once per episode (sessions that cannot move would repeat it each second).
        if asked > 0 && !asking {
            info!(pool = %pool.name, ?loads, asked, "rebalancing: asking sessions to move");
        } else if asked > 0 {
            debug!(pool = %pool.name, ?loads, asked, "rebalancing: asking sessions to move");
        } else if asking {
            info!(pool = %pool.name, ?loads, "rebalancing: spread even again");
        }
        asking = asked > 0;
        for b in members.iter() {
            let n = usable
                .iter()
                .position(|u| Arc::ptr_eq(u, b))
                .map_or(0, |i| moves[i]);
            b.request_shed(n);
        }
    }
}

/// How many sessions each backend should shed this second: from the most
/// loaded down, each towards the (rounded up) mean, `budget` in all, and
/// nothing while every load is within `mean * (1 + tolerance) + 1`.
pub fn plan(loads: &[usize], budget: usize, tolerance: f64) -> Vec<usize> {
    let mut moves = vec![0; loads.len()];
    if loads.len() < 2 {
        return moves;
    }
    let total: usize = loads.iter().sum();
    let mean = total as f64 / loads.len() as f64;
    let limit = mean * (1.0 + tolerance) + 1.0;
    if !loads.iter().any(|&l| l as f64 > limit) {
        return moves;
    }
    let target = mean.ceil() as usize;
    let mut order: Vec<usize> = (0..loads.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(loads[i]));
    let mut left = budget;
    for i in order {
        let excess = loads[i].saturating_sub(target);
        let n = excess.min(left);
        moves[i] = n;
        left -= n;
        if left == 0 {
            break;
        }
    }
    moves
}

#[cfg(test)]
mod tests {
    use super::plan;

    #[test]
    fn sheds_the_most_loaded_towards_the_mean_within_the_budget() {
        // A new backend (0) beside two loaded ones: mean 40.
        assert_eq!(plan(&[60, 60, 0], 10, 0.2), vec![10, 0, 0]);
        assert_eq!(plan(&[60, 60, 0], 100, 0.2), vec![20, 20, 0]);
        assert_eq!(plan(&[90, 30, 0], 100, 0.2), vec![50, 0, 0]);
    }

    #[test]
    fn an_even_enough_spread_is_left_alone() {
        assert_eq!(plan(&[41, 40, 39], 10, 0.2), vec![0, 0, 0]);
        assert_eq!(plan(&[2, 0], 10, 0.0), vec![0, 0], "within one session");
        assert_eq!(plan(&[5], 10, 0.2), vec![0]);
        assert_eq!(plan(&[], 10, 0.2), Vec::<usize>::new());
        assert_eq!(plan(&[0, 0, 0], 10, 0.2), vec![0, 0, 0]);
    }
}
