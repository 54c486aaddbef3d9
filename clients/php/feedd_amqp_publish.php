<?php
// feedd producer in PHP with the AMQP extension the replaced daemon's producers used (Debian:
// apt install php-cli php-amqp): it publishes to the EXCHANGE feedd consumes through
// ([amqp] exchange, exchange_type, routing_key), not to the queue. Copy it and keep its rules:
//
//  1. Publisher confirms (confirmSelect + waitForConfirm): a message counts as sent only once
//     the broker acked it; then it is on disk (delivery_mode 2 into a durable queue) and feedd
//     will commit it. No confirm (timeout, lost connection) or a nack: publish it again on a
//     fresh connection. feedd is idempotent on the ticket, so a copy is stored once.
//  2. Mandatory: an exchange bound to no queue (feedd never started on this broker, or another
//     routing key) would drop the message and still ack it. Mandatory makes the broker return
//     it instead, and this producer then fails (exit 1) rather than report records as sent.
//  3. Persistent messages (delivery_mode 2).
//
// Records whose message feedd refuses (malformed, a ticket stored with other values) go to
// feedd's dead-letter queue with the reason; the producer learns nothing of them.
//
// Usage: php feedd_amqp_publish.php [--per-message=N] [--routing-key=K] [--window=W]
//                                   [--timeout-ms=T] [--retries=R] URL EXCHANGE [FILE]
//   URL: amqp://USER:PASS@HOST:5672/VHOST (%2f is the vhost "/"); or set FEEDD_AMQP_URL and
//   pass "-" to keep the password off the command line. --routing-key: the key feedd binds
//   its queue with ([amqp] routing_key; when that is empty, the queue's name); default empty
//   (enough for a fanout exchange).
//   Reads records "ticket,login,volume", one per line, from FILE (or stdin), N per message
//   (default 100), W messages per confirm round (default 100). Exit 0: every message
//   confirmed; 1: some message returned unroutable (nothing bound); 2: gave up (not confirmed
//   after R retries: no broker, nacks) or bad usage.

function usage(string $why): void
{
    fwrite(STDERR, "feedd_amqp_publish.php: $why\n");
    fwrite(STDERR, "usage: php feedd_amqp_publish.php [--per-message=N] [--routing-key=K] [--window=W] [--timeout-ms=T] [--retries=R] URL EXCHANGE [FILE]\n");
    exit(2);
}

// The php-amqp connection settings of an amqp:// URL.
function credentials(string $url, int $timeout_ms): array
{
    $u = parse_url($url);
    if ($u === false || ($u['scheme'] ?? '') !== 'amqp' || !isset($u['host'])) {
        usage('URL must look like amqp://USER:PASS@HOST:5672/VHOST');
    }
    $vhost = isset($u['path']) && $u['path'] !== '/' && $u['path'] !== '' ? rawurldecode(substr($u['path'], 1)) : '/';
    $seconds = $timeout_ms / 1000.0;
    return [
        'host' => $u['host'],
        'port' => $u['port'] ?? 5672,
        'vhost' => $vhost,
        'login' => rawurldecode($u['user'] ?? 'guest'),
        'password' => rawurldecode($u['pass'] ?? 'guest'),
        'connect_timeout' => $seconds,
        'read_timeout' => $seconds,
        'write_timeout' => $seconds,
    ];
}

// A confirming channel on a fresh connection, and the exchange to publish to.
function open(array $credentials, string $exchange_name): array
{
    $connection = new AMQPConnection($credentials);
    $connection->connect();
    $channel = new AMQPChannel($connection);
    $channel->confirmSelect();
    $exchange = new AMQPExchange($channel);
    // Not declared here: feedd declares it (durable, its type) and binds its queue.
    $exchange->setName($exchange_name);
    return [$connection, $channel, $exchange];
}

// Publishes $bodies and waits for their confirms. Returns [confirmed, refused]: refused holds
// the indexes the broker returned unroutable (with the reason); the others of $bodies that
// are in neither were nacked or not confirmed in time. Throws on a broken connection.
function publish_round(AMQPChannel $channel, AMQPExchange $exchange, array $bodies,
                       string $routing_key, int $timeout_ms): array
{
    // A channel in confirm mode numbers its publishes 1, 2, … (the confirms' delivery tags).
    static $seq = [];
    $id = spl_object_id($channel);
    $first = ($seq[$id] ?? 0) + 1;
    $pending = [];
    $refused = [];
    foreach ($bodies as $i => $body) {
        $exchange->publish($body, $routing_key, AMQP_MANDATORY, [
            'delivery_mode' => 2,
            'content_type' => 'text/plain',
            'message_id' => (string)$i,
        ]);
        $pending[$first + count($pending)] = $i;
    }
    $seq[$id] = $first + count($pending) - 1;
    $confirmed = [];
    $settle = function (int $tag, bool $multiple, bool $acked) use (&$pending, &$confirmed, &$refused): bool {
        foreach ($pending as $t => $i) {
            if ($t === $tag || ($multiple && $t < $tag)) {
                // A nacked one is neither: the caller publishes it again.
                if ($acked && !isset($refused[$i])) {
                    $confirmed[] = $i;
                }
                unset($pending[$t]);
            }
        }
        return count($pending) > 0; // false: stop waiting
    };
    $channel->setConfirmCallback(
        fn(int $tag, bool $multiple): bool => $settle($tag, $multiple, true),
        fn(int $tag, bool $multiple, bool $requeue): bool => $settle($tag, $multiple, false)
    );
    // A returned message comes before its ack; its message_id says which one it was.
    $channel->setReturnCallback(
        function (int $code, string $text, string $x, string $key, AMQPBasicProperties $p, string $body) use (&$refused): bool {
            $refused[(int)$p->getMessageId()] = "returned: $code $text (exchange '$x', routing key '$key'): is feedd's queue bound to it?";
            return true;
        }
    );
    try {
        $channel->waitForConfirm($timeout_ms / 1000.0);
    } catch (AMQPQueueException $e) {
        // Timed out: what is still pending is published again by the caller.
    }
    return [$confirmed, $refused];
}

$options = getopt('', ['per-message:', 'routing-key:', 'window:', 'timeout-ms:', 'retries:'], $rest);
$args = array_slice($argv, $rest);
if (count($args) < 2 || count($args) > 3) {
    usage('wrong number of arguments');
}
$url = $args[0] === '-' ? (getenv('FEEDD_AMQP_URL') ?: '') : $args[0];
$exchange_name = $args[1];
$routing_key = $options['routing-key'] ?? '';
$per_message = (int)($options['per-message'] ?? 100);
$window = (int)($options['window'] ?? 100);
$timeout_ms = (int)($options['timeout-ms'] ?? 5000);
$retries = (int)($options['retries'] ?? 10);
if ($per_message < 1 || $window < 1 || $timeout_ms < 1 || $retries < 0) {
    usage('--per-message, --window and --timeout-ms must be positive, --retries not negative');
}
$credentials = credentials($url, $timeout_ms);
$input = isset($args[2]) ? @fopen($args[2], 'r') : STDIN;
if ($input === false) {
    usage("cannot open {$args[2]}");
}

$messages = [];
$batch = [];
while (($line = fgets($input)) !== false) {
    $line = trim($line);
    if ($line === '') {
        continue;
    }
    $batch[] = $line;
    if (count($batch) >= $per_message) {
        $messages[] = implode("\n", $batch);
        $batch = [];
    }
}
if ($batch) {
    $messages[] = implode("\n", $batch);
}

$link = null;
$sent = 0;
$refused = 0;
foreach (array_chunk($messages, $window) as $round) {
    $todo = $round;
    for ($attempt = 0; $todo; $attempt++) {
        if ($attempt > $retries) {
            fwrite(STDERR, "gave up: " . count($todo) . " messages not confirmed after " . ($retries + 1) . " attempts\n");
            exit(2);
        }
        try {
            $link = $link ?? open($credentials, $exchange_name);
            [$confirmed, $bad] = publish_round($link[1], $link[2], $todo, $routing_key, $timeout_ms);
        } catch (AMQPException $e) {
            // Connection or channel lost (or the exchange missing: 404): a fresh connection,
            // and everything of this round not yet confirmed is published again.
            fwrite(STDERR, "broker: {$e->getMessage()}; publishing again on a fresh connection\n");
            $link = null;
            usleep(min(100000 * (1 << min($attempt, 5)), 2000000));
            continue;
        }
        foreach ($bad as $i => $why) {
            fwrite(STDERR, "message starting with ticket " . strtok($todo[$i], ',') . ": $why\n");
            $refused++;
        }
        $sent += count($confirmed);
        $left = [];
        foreach ($todo as $i => $body) {
            if (!in_array($i, $confirmed, true) && !isset($bad[$i])) {
                $left[] = $body;
            }
        }
        if ($left) {
            fwrite(STDERR, count($left) . " messages nacked or not confirmed within {$timeout_ms} ms; publishing them again\n");
            $link = null;
        }
        $todo = $left;
    }
}
if ($link !== null) {
    $link[0]->disconnect();
}
echo "$sent messages confirmed, $refused refused\n";
exit($refused > 0 ? 1 : 0);
