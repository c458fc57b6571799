//! Batching of writes: the commands callers submit meanwhile go together to
//! one `send` (one log entry, or one forwarded message), with at most
//! `max_in_flight` sends running at a time.
//!
//! The caller that finds a free slot and nothing queued before it sends its
//! command itself, in its own task: a lone write (one client) does not pass
//! through another task and back. A batch holding the commands of other callers
//! runs in a task of its own, so that one caller going away (its request
//! dropped) never drops the others' writes.
use futures::future::BoxFuture;
use orc_api::mutation::Command;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::oneshot;

/// A command, its estimated JSON size (made before the queue is locked) and
/// where its result goes.
type Job<R> = (Arc<Command>, usize, oneshot::Sender<R>);
type SendFn<R> = dyn Fn(Vec<Arc<Command>>) -> BoxFuture<'static, Vec<R>> + Send + Sync;

/// How much goes together.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Sends running at once, at most.
    pub max_in_flight: usize,
    /// Commands in one batch, at most.
    pub max_batch: usize,
    /// Estimated serialized bytes in one batch, at most (a larger single
    /// command still goes alone).
    pub max_batch_bytes: usize,
}

struct Queue<R> {
    waiting: VecDeque<Job<R>>,
    in_flight: usize,
}

pub struct Batcher<R> {
    queue: Mutex<Queue<R>>,
    send: Box<SendFn<R>>,
    limits: Limits,
}

/// A send slot, held while a batch runs. Dropping it (the batch done, or its
/// caller gone) hands the slot to the commands queued meanwhile, if any.
struct Slot<R: Send + 'static>(Arc<Batcher<R>>);

impl<R: Send + 'static> Drop for Slot<R> {
    fn drop(&mut self) {
        let next = {
            let mut q = self.0.lock();
            if q.waiting.is_empty() {
                q.in_flight -= 1;
                None
            } else {
                Some(self.0.take(&mut q))
            }
        };
        if let Some(batch) = next {
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn(self.0.clone().run_owned(batch));
                }
                // No runtime (shutting down): the queued callers see their
                // answer dropped.
                Err(_) => self.0.lock().in_flight -= 1,
            }
        }
    }
}

impl<R: Send + 'static> Batcher<R> {
    pub fn new<F, Fut>(limits: Limits, send: F) -> Arc<Self>
    where
        F: Fn(Vec<Arc<Command>>) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Vec<R>> + Send + 'static,
    {
        Arc::new(Batcher {
            queue: Mutex::new(Queue {
                waiting: VecDeque::new(),
                in_flight: 0,
            }),
            send: Box::new(move |cmds| Box::pin(send(cmds))),
            limits,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Queue<R>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The next batch from the front of the queue (never empty when the queue is not).
    fn take(&self, q: &mut Queue<R>) -> Vec<Job<R>> {
        let mut batch = Vec::new();
        let mut size = 0;
        while let Some(job) = q.waiting.front() {
            let bytes = job.1;
            if !batch.is_empty()
                && (batch.len() >= self.limits.max_batch
                    || size + bytes > self.limits.max_batch_bytes)
            {
                break;
            }
            size += bytes;
            batch.extend(q.waiting.pop_front());
        }
        batch
    }

    async fn run(&self, batch: Vec<Job<R>>) {
        let (cmds, txs): (Vec<_>, Vec<_>) = batch.into_iter().map(|(c, _, tx)| (c, tx)).unzip();
        for (tx, r) in txs.into_iter().zip((self.send)(cmds).await) {
            let _ = tx.send(r);
        }
    }

    async fn run_owned(self: Arc<Self>, batch: Vec<Job<R>>) {
        let _slot = Slot(self.clone());
        self.run(batch).await;
    }

    /// Submit `cmd` and wait for its result (None: its batch was dropped
    /// unanswered, which happens only when the runtime shuts down).
    pub async fn submit(self: &Arc<Self>, cmd: Arc<Command>) -> Option<R> {
        let (tx, rx) = oneshot::channel();
        let bytes = cmd.approx_json_len();
        let batch = {
            let mut q = self.lock();
            q.waiting.push_back((cmd, bytes, tx));
            // Commands wait only while every slot is taken, so a free slot
            // means this command is alone in the queue.
            (q.in_flight < self.limits.max_in_flight).then(|| {
                q.in_flight += 1;
                self.take(&mut q)
            })
        };
        match batch {
            Some(batch) if batch.len() == 1 => {
                let _slot = Slot(self.clone());
                self.run(batch).await;
            }
            Some(batch) => {
                tokio::spawn(self.clone().run_owned(batch));
            }
            None => {}
        }
        rx.await.ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use orc_api::mutation::ObjectKey;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    fn cmd(i: usize) -> Arc<Command> {
        Arc::new(Command::Create {
            key: ObjectKey::new("configmaps", "default", &format!("c{i}")),
            object: serde_json::Value::Null,
        })
    }

    fn name(c: &Command) -> String {
        match c {
            Command::Create { key, .. } => key.name.clone(),
            _ => unreachable!(),
        }
    }

    const LIMITS: Limits = Limits {
        max_in_flight: 2,
        max_batch: 4,
        max_batch_bytes: 1 << 20,
    };

    /// Every caller gets its own command's result; no more than
    /// `max_in_flight` sends run at once; batches respect `max_batch`; and
    /// commands queued behind busy slots go together.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn callers_get_their_own_results_and_batches_respect_limits() {
        let running = Arc::new(AtomicUsize::new(0));
        let max_running = Arc::new(AtomicUsize::new(0));
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let (r, m, s) = (running.clone(), max_running.clone(), sizes.clone());
        let b = Batcher::new(LIMITS, move |cmds: Vec<Arc<Command>>| {
            let (r, m, s) = (r.clone(), m.clone(), s.clone());
            async move {
                let now = r.fetch_add(1, Ordering::SeqCst) + 1;
                m.fetch_max(now, Ordering::SeqCst);
                s.lock().unwrap().push(cmds.len());
                tokio::time::sleep(Duration::from_millis(5)).await;
                r.fetch_sub(1, Ordering::SeqCst);
                cmds.iter().map(|c| name(c)).collect::<Vec<_>>()
            }
        });
        let calls = (0..40).map(|i| {
            let b = b.clone();
            tokio::spawn(async move { (i, b.submit(cmd(i)).await) })
        });
        for c in futures::future::join_all(calls).await {
            let (i, got) = c.unwrap();
            assert_eq!(got.as_deref(), Some(format!("c{i}").as_str()));
        }
        assert!(max_running.load(Ordering::SeqCst) <= 2);
        let sizes = sizes.lock().unwrap().clone();
        assert_eq!(sizes.iter().sum::<usize>(), 40);
        assert!(sizes.iter().all(|&n| (1..=4).contains(&n)), "{sizes:?}");
        assert!(
            sizes.iter().any(|&n| n > 1),
            "nothing was batched: {sizes:?}"
        );
        assert_eq!(b.lock().in_flight, 0);
    }

    /// A caller that gives up while its lone command is being sent frees its
    /// slot, and the commands queued behind it still go.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_caller_gone_mid_send_frees_its_slot() {
        let limits = Limits {
            max_in_flight: 1,
            ..LIMITS
        };
        let b = Batcher::new(limits, |cmds: Vec<Arc<Command>>| async move {
            if cmds.iter().any(|c| name(c) == "c0") {
                std::future::pending::<()>().await;
            }
            cmds.iter().map(|c| name(c)).collect::<Vec<_>>()
        });
        let b0 = b.clone();
        let stuck = tokio::spawn(async move { b0.submit(cmd(0)).await });
        while b.lock().in_flight == 0 {
            tokio::task::yield_now().await;
        }
        let b1 = b.clone();
        let queued = tokio::spawn(async move { b1.submit(cmd(1)).await });
        while b.lock().waiting.is_empty() {
            tokio::task::yield_now().await;
        }
        stuck.abort();
        let got = tokio::time::timeout(Duration::from_secs(5), queued)
            .await
            .expect("the queued command went")
            .unwrap();
        assert_eq!(got.as_deref(), Some("c1"));
        assert_eq!(b.lock().in_flight, 0);
    }
}
