<#
.SYNOPSIS
Hashes an image file's fixed-size blocks on a Windows host and PUTs changed blocks straight to
Azure Blob, for a patchdrill backup (docs/repository.md, *Windows hosts*).

.DESCRIPTION
-Path is what the backup reads: normally an image file (VHD, VHDX, raw) inside a VSS shadow copy,
so it cannot change while it is read. Two modes, because the controller can only sign upload
URLs for blocks it knows have changed, and it signs one write-only URL per blob rather than
handing the host a container-wide SAS that could create or overwrite anything:

  -Mode Scan
      One JSON object: {"kind": "block", "hash": "sha256", "size": N, "block_size": B,
      "fingerprints": "<hex of the 32-byte SHA-256 of every block, concatenated in order>"}.
      A directory is not read; the object is then {"kind": "directory", "path": …}, and the
      controller says that directory disks of Windows hosts are not supported.
  -Mode Upload -Uploads "<index> <url>`n<index> <url>…"
      Reads each listed block again, PUTs it raw to its SAS URL as a block blob (parallel
      requests in a runspace pool: PowerShell 5.1 has no ForEach-Object -Parallel), and prints
      {"blocks": [{"index", "bytes", "sha256"}], "bytes_sent": N}. The controller checks the
      hashes against the scan and again on the data it downloads from staging.

Only hashes and this report cross WinRM; the data goes to Azure Blob over HTTPS. A failed PUT
is retried when the fault is transient (no answer, 408, 429, 5xx); an expired or refused SAS is
not. Failures exit 1 with one message per failed block on stderr; the URLs' signatures are never
printed.
#>
param(
    [Parameter(Mandatory = $true)][ValidateSet('Scan', 'Upload')][string]$Mode,
    [Parameter(Mandatory = $true)][string]$Path,
    [Parameter(Mandatory = $true)][ValidateRange(4096, 67108864)][int]$BlockSize,
    [string]$Uploads = '',
    [ValidateRange(1, 64)][int]$Threads = 4,
    [ValidateRange(1, 10)][int]$Attempts = 4
)

$ErrorActionPreference = 'Stop'
Set-StrictMode -Version 3

function New-Sha256 {
    # SHA256Cng uses the CPU's SHA extensions; SHA256.Create() gives the much slower managed
    # implementation on .NET Framework, which would make hashing, not the disk, the bottleneck.
    try {
        return New-Object System.Security.Cryptography.SHA256Cng
    }
    catch {
        return [System.Security.Cryptography.SHA256]::Create()
    }
}

# Explicit param() blocks: these bodies are also copied into the pool's runspaces by text.
function ConvertTo-Hex {
    param([byte[]]$Bytes)
    return [BitConverter]::ToString($Bytes).Replace('-', '').ToLowerInvariant()
}

function Open-Image {
    param([string]$Image)
    # FileShare.ReadWrite: a live image (no snapshot) may be held open for writing by its VM.
    return [System.IO.File]::Open($Image, [System.IO.FileMode]::Open, [System.IO.FileAccess]::Read,
        [System.IO.FileShare]::ReadWrite)
}

function Read-Block {
    param([System.IO.Stream]$Stream, [byte[]]$Buffer, [int]$Count)
    # Stream.Read may return fewer bytes than asked; a block is complete only when all arrived.
    $filled = 0
    while ($filled -lt $Count) {
        $got = $Stream.Read($Buffer, $filled, $Count - $filled)
        if ($got -le 0) {
            throw "the image ended $($Count - $filled) bytes short of a block at offset $($Stream.Position)"
        }
        $filled += $got
    }
}

# The functions the pool's runspaces need: each runspace starts with only what it is given.
$SharedFunctions = 'New-Sha256', 'ConvertTo-Hex', 'Open-Image', 'Read-Block'

function Invoke-Scan {
    if (Test-Path -LiteralPath $Path -PathType Container) {
        return [ordered]@{ kind = 'directory'; path = $Path }
    }
    $stream = Open-Image $Path
    $sha = New-Sha256
    try {
        $size = $stream.Length
        $count = [long][Math]::Ceiling($size / [double]$BlockSize)
        $hex = New-Object System.Text.StringBuilder ([int]($count * 64))
        # One buffer reused for every block: a fresh 4 MiB array per block costs page faults
        # and garbage collections.
        $buffer = New-Object byte[] $BlockSize
        $remaining = $size
        while ($remaining -gt 0) {
            $want = [int][Math]::Min([long]$BlockSize, $remaining)
            Read-Block $stream $buffer $want
            [void]$hex.Append((ConvertTo-Hex ($sha.ComputeHash($buffer, 0, $want))))
            $remaining -= $want
        }
    }
    finally {
        $sha.Dispose()
        $stream.Dispose()
    }
    return [ordered]@{ kind = 'block'; hash = 'sha256'; size = $size; block_size = $BlockSize; fingerprints = $hex.ToString() }
}

# Runs in a runspace of the pool: reads one block, hashes it and PUTs it to its URL.
$PutBlock = {
    param([string]$Image, [long]$BlockSize, [long]$Index, [string]$Url, [int]$Attempts)
    $ErrorActionPreference = 'Stop'
    $stream = Open-Image $Image
    try {
        $offset = $Index * $BlockSize
        $length = [int][Math]::Min($BlockSize, $stream.Length - $offset)
        if ($length -le 0) {
            throw "beyond the end of the image ($($stream.Length) bytes)"
        }
        $buffer = New-Object byte[] $length
        [void]$stream.Seek($offset, [System.IO.SeekOrigin]::Begin)
        Read-Block $stream $buffer $length
    }
    finally {
        $stream.Dispose()
    }
    $sha = New-Sha256
    try {
        $digest = ConvertTo-Hex ($sha.ComputeHash($buffer))
    }
    finally {
        $sha.Dispose()
    }
    $attempt = 0
    while ($true) {
        $attempt += 1
        $status = 0
        try {
            $request = [System.Net.HttpWebRequest]::Create($Url)
            $request.Method = 'PUT'
            $request.Headers.Add('x-ms-blob-type', 'BlockBlob')
            $request.ContentType = 'application/octet-stream'
            $request.ContentLength = $length
            # Stream the body as it is: buffering would copy every block once more.
            $request.AllowWriteStreamBuffering = $false
            $request.Timeout = 300000
            $request.ReadWriteTimeout = 300000
            $body = $request.GetRequestStream()
            try {
                $body.Write($buffer, 0, $length)
            }
            finally {
                $body.Dispose()
            }
            $response = $request.GetResponse()
            $response.Dispose()
            break
        }
        catch {
            # PowerShell wraps .NET exceptions; the WebException inside carries the HTTP status.
            $failure = $_.Exception
            while ($null -ne $failure.InnerException -and $failure -isnot [System.Net.WebException]) {
                $failure = $failure.InnerException
            }
            if ($failure -is [System.Net.WebException] -and $null -ne $failure.Response) {
                $status = [int]$failure.Response.StatusCode
                $failure.Response.Dispose()
            }
            # No answer (status 0: reset, timeout), 408, 429 and 5xx are worth another try; a
            # refused or expired SAS (403) or a bad request does not get better by retrying.
            $transient = ($status -eq 0) -or ($status -eq 408) -or ($status -eq 429) -or ($status -ge 500)
            if ((-not $transient) -or ($attempt -ge $Attempts)) {
                throw "PUT failed after $attempt attempt(s): HTTP $status $($failure.Message)"
            }
            # Exponential backoff with jitter, so parallel requests do not retry in step.
            Start-Sleep -Milliseconds ([int](500 * [Math]::Pow(2, $attempt - 1) + (Get-Random -Maximum 500)))
        }
    }
    return [pscustomobject]@{ index = $Index; bytes = $length; sha256 = $digest }
}

function Invoke-Upload {
    $work = New-Object System.Collections.Generic.List[object]
    foreach ($line in ($Uploads -split "`r?`n")) {
        if ($line.Trim() -eq '') {
            continue
        }
        $index, $url = $line.Trim() -split ' ', 2
        if ($null -eq $url -or $index -notmatch '^\d+$' -or $url -notmatch '^https?://') {
            throw "upload list line $($work.Count + 1) is not '<index> <url>'"
        }
        $work.Add([pscustomobject]@{ Index = [long]$index; Url = $url })
    }
    if (-not (Test-Path -LiteralPath $Path -PathType Leaf)) {
        throw "$Path is not a file"
    }
    # Azure Blob accepts TLS 1.2 and later; .NET Framework may offer only older versions unless told.
    [System.Net.ServicePointManager]::SecurityProtocol = [System.Net.ServicePointManager]::SecurityProtocol -bor
        [System.Net.SecurityProtocolType]::Tls12
    # .NET Framework allows 2 connections per server by default, which would cap the pool at 2.
    [System.Net.ServicePointManager]::DefaultConnectionLimit = [Math]::Max($Threads * 2,
        [System.Net.ServicePointManager]::DefaultConnectionLimit)
    # No 100-continue round trip before every block: the SAS was just signed for this host.
    [System.Net.ServicePointManager]::Expect100Continue = $false

    $state = [System.Management.Automation.Runspaces.InitialSessionState]::CreateDefault()
    foreach ($name in $SharedFunctions) {
        $state.Commands.Add((New-Object System.Management.Automation.Runspaces.SessionStateFunctionEntry -ArgumentList $name,
                (Get-Item -LiteralPath "function:$name").Definition))
    }
    $pool = [RunspaceFactory]::CreateRunspacePool(1, $Threads, $state, $Host)
    $pool.Open()
    $jobs = New-Object System.Collections.Generic.List[object]
    $blocks = New-Object System.Collections.Generic.List[object]
    $errors = New-Object System.Collections.Generic.List[string]
    [long]$sent = 0
    try {
        # The pool runs at most $Threads at once; each job reads its own block when it starts,
        # so memory stays at $Threads blocks however many are queued.
        foreach ($item in $work) {
            $shell = [PowerShell]::Create()
            $shell.RunspacePool = $pool
            [void]$shell.AddScript($PutBlock).AddArgument($Path).AddArgument([long]$BlockSize).AddArgument($item.Index).AddArgument($item.Url).AddArgument($Attempts)
            $jobs.Add([pscustomobject]@{ Shell = $shell; Handle = $shell.BeginInvoke(); Index = $item.Index })
        }
        foreach ($job in $jobs) {
            try {
                foreach ($result in $job.Shell.EndInvoke($job.Handle)) {
                    $blocks.Add([ordered]@{ index = $result.index; bytes = $result.bytes; sha256 = $result.sha256 })
                    $sent += $result.bytes
                }
            }
            catch {
                $reason = $_.Exception
                while ($null -ne $reason.InnerException) {
                    $reason = $reason.InnerException
                }
                $errors.Add("block $($job.Index): $($reason.Message)")
            }
            finally {
                $job.Shell.Dispose()
            }
        }
    }
    finally {
        $pool.Close()
        $pool.Dispose()
    }
    if ($errors.Count -gt 0) {
        throw ("$($errors.Count) of $($work.Count) block uploads failed: " + ($errors -join '; '))
    }
    return [ordered]@{ blocks = $blocks.ToArray(); bytes_sent = $sent }
}

if ($Mode -eq 'Scan') {
    $report = Invoke-Scan
}
else {
    $report = Invoke-Upload
}
$report | ConvertTo-Json -Depth 4 -Compress
