<?php
// feedd client in PHP with php-zmq (Debian: apt install php-cli php-zmq): a REQ socket, as the
// original PHP daemon's senders used. Copy it and keep the three rules it shows:
//
//  1. Wait for the reply with a timeout (ZMQ::SOCKOPT_RCVTIMEO); never block forever.
//  2. On a timeout, close the REQ socket and open a fresh one: a REQ that sent and got no
//     reply cannot send again (its state machine is stuck waiting).
//  3. Resend the same message, unchanged. feedd is idempotent on the ticket: a record already
//     stored with the same login and volume is answered TRUE again and stored once.
//
// TRUE means every record of the message is committed. FALSE <reason> means none of them is
// stored (malformed, too large, or a ticket stored with other values): resending will not help.
//
// Usage: php feedd_req.php [--per-message=N] [--timeout-ms=T] [--retries=R] ENDPOINT [FILE]
//   Reads records "ticket,login,volume", one per line, from FILE (or stdin), sends N per
//   message (default 100). Exit 0: all TRUE; 1: some message got FALSE; 2: gave up or bad usage.

function usage(string $why): void
{
    fwrite(STDERR, "feedd_req.php: $why\n");
    fwrite(STDERR, "usage: php feedd_req.php [--per-message=N] [--timeout-ms=T] [--retries=R] ENDPOINT [FILE]\n");
    exit(2);
}

function connect(ZMQContext $context, string $endpoint, int $timeout_ms): ZMQSocket
{
    $socket = $context->getSocket(ZMQ::SOCKET_REQ);
    // Closing must not wait for unsent messages of a socket we give up on.
    $socket->setSockOpt(ZMQ::SOCKOPT_LINGER, 0);
    $socket->setSockOpt(ZMQ::SOCKOPT_RCVTIMEO, $timeout_ms);
    $socket->setSockOpt(ZMQ::SOCKOPT_SNDTIMEO, $timeout_ms);
    $socket->connect($endpoint);
    return $socket;
}

// Sends one message until it is answered; returns the reply, or null after $retries timeouts.
function ask(ZMQContext $context, ZMQSocket &$socket, string $endpoint, string $body,
             int $timeout_ms, int $retries): ?string
{
    for ($attempt = 0; $attempt <= $retries; $attempt++) {
        try {
            if ($socket->send($body) !== false) {
                $reply = $socket->recv();
                if ($reply !== false) {
                    return $reply;
                }
            }
        } catch (ZMQSocketException $e) {
            // Treated like a timeout: fresh socket, same message.
        }
        fwrite(STDERR, "no reply within {$timeout_ms} ms, resending on a fresh socket\n");
        $socket->disconnect($endpoint);
        $socket = connect($context, $endpoint, $timeout_ms);
    }
    return null;
}

$options = getopt('', ['per-message:', 'timeout-ms:', 'retries:'], $rest);
$args = array_slice($argv, $rest);
if (count($args) < 1 || count($args) > 2) {
    usage('wrong number of arguments');
}
$endpoint = $args[0];
$per_message = (int)($options['per-message'] ?? 100);
$timeout_ms = (int)($options['timeout-ms'] ?? 2500);
$retries = (int)($options['retries'] ?? 10);
if ($per_message < 1 || $timeout_ms < 1 || $retries < 0) {
    usage('--per-message and --timeout-ms must be positive, --retries not negative');
}
$input = isset($args[1]) ? @fopen($args[1], 'r') : STDIN;
if ($input === false) {
    usage("cannot open {$args[1]}");
}

$context = new ZMQContext(1);
$socket = connect($context, $endpoint, $timeout_ms);
$sent = 0;
$falses = 0;
$batch = [];
$flush = function () use (&$batch, &$sent, &$falses, &$socket, $context, $endpoint, $timeout_ms, $retries) {
    if (!$batch) {
        return;
    }
    $reply = ask($context, $socket, $endpoint, implode("\n", $batch), $timeout_ms, $retries);
    if ($reply === null) {
        fwrite(STDERR, "gave up: no reply after " . ($retries + 1) . " attempts\n");
        exit(2);
    }
    if ($reply !== 'TRUE') {
        // Rejected whole: none of these records is stored.
        $falses++;
        fwrite(STDERR, "$reply (message starting with ticket " . strtok($batch[0], ',') . ")\n");
    }
    $sent += count($batch);
    $batch = [];
};
while (($line = fgets($input)) !== false) {
    $line = trim($line);
    if ($line === '') {
        continue;
    }
    $batch[] = $line;
    if (count($batch) >= $per_message) {
        $flush();
    }
}
$flush();
echo "$sent records sent, $falses messages refused\n";
exit($falses > 0 ? 1 : 0);
